# tokentap container image: built in a Rust image, run from a small Debian one as a non-root
# user. The config lives in /etc/tokentap (mount a directory there: editors and Kubernetes
# replace files by rename, which a directory mount follows, so edits hot-reload).
#
#   docker build -t tokentap .
#   docker run -p 8080:8080 -p 9464:9464 -v tokentap-data:/var/lib/tokentap tokentap

FROM rust:1.95-bookworm AS build
# Pingora's zlib-ng needs cmake.
RUN apt-get update && apt-get install -y --no-install-recommends cmake \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src ./src
# A workspace member: cargo reads its manifest even when building tokentap alone.
COPY bench ./bench
RUN cargo build --release --locked --bin tokentap --bin tokentap-mock \
    && strip target/release/tokentap target/release/tokentap-mock

FROM debian:bookworm-slim
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 --home-dir /var/lib/tokentap --create-home tokentap
COPY --from=build /src/target/release/tokentap /src/target/release/tokentap-mock /usr/local/bin/
COPY deploy/container/tokentap.toml config/pricing.toml /etc/tokentap/
USER 10001
WORKDIR /var/lib/tokentap
EXPOSE 8080 9464
# The admin listener's /healthz (tokentap health exits 0 when it answers 200).
HEALTHCHECK --interval=10s --timeout=3s --start-period=5s --retries=3 \
    CMD ["tokentap", "health", "--admin", "127.0.0.1:9464"]
ENTRYPOINT ["tokentap"]
CMD ["serve", "--config", "/etc/tokentap/tokentap.toml"]
