#!/usr/bin/env bash
# A CA and a certificate for the compose stack's Redis (docker-compose.tls.yml), made with
# openssl into this directory (or the one given): ca.crt, ca.key, redis.crt, redis.key. The
# certificate names "redis" (the host tokentap dials in the stack), localhost and 127.0.0.1,
# and is valid for a year. For a local stack only: production certificates come from your PKI
# or cert-manager. Run it again after deleting the files to make new ones.
set -euo pipefail
out=${1:-$(dirname "$0")}
cd "$out"
if [ -e ca.crt ] || [ -e redis.crt ]; then
    echo "$out already holds ca.crt or redis.crt: delete them to make new ones" >&2
    exit 1
fi
cnf=$(mktemp)
trap 'rm -f "$cnf" redis.csr ca.srl' EXIT
trap 'echo "make-certs.sh: openssl failed" >&2' ERR
cat >"$cnf" <<'CNF'
[req]
distinguished_name = dn
prompt = no
[dn]
CN = tokentap compose Redis CA
[ca]
basicConstraints = critical, CA:TRUE
keyUsage = critical, keyCertSign, cRLSign
subjectKeyIdentifier = hash
[server]
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature, keyEncipherment
extendedKeyUsage = serverAuth
subjectAltName = DNS:redis, DNS:localhost, IP:127.0.0.1
CNF
openssl req -x509 -new -nodes -newkey rsa:2048 -keyout ca.key -out ca.crt -days 365 \
    -config "$cnf" -extensions ca 2>/dev/null
openssl req -new -nodes -newkey rsa:2048 -keyout redis.key -out redis.csr \
    -config "$cnf" -subj "/CN=redis" 2>/dev/null
openssl x509 -req -in redis.csr -CA ca.crt -CAkey ca.key -CAcreateserial -out redis.crt \
    -days 365 -extfile "$cnf" -extensions server 2>/dev/null
# Redis runs as its own user in the container and tokentap as uid 10001: both must read
# what they use (redis.key stays on this machine, for this local stack).
chmod 644 ca.crt redis.crt redis.key
chmod 600 ca.key
echo "made $(cd "$out" && pwd)/{ca.crt,ca.key,redis.crt,redis.key}"
