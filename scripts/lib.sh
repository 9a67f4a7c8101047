# Shared helpers for scripts/*.sh: find or install what the build and the tests need.
# Installs Debian packages only when running as root; otherwise says what is missing.

APT_UPDATED=""

# install_deb PACKAGE: install a Debian package if root, else explain and fail.
install_deb() {
    local pkg=$1
    if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null 2>&1; then
        echo ">> installing $pkg" >&2
        if [ -z "$APT_UPDATED" ]; then
            DEBIAN_FRONTEND=noninteractive apt-get update -qq >&2 ||
                echo "warning: apt-get update failed; trying to install from the current lists" >&2
            APT_UPDATED=1
        fi
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$pkg" >&2 && return 0
    fi
    echo "error: the Debian package '$pkg' is missing. Install it with: sudo apt-get install $pkg" >&2
    exit 1
}

# need_deb COMMAND PACKAGE: make sure COMMAND exists, installing PACKAGE if needed.
need_deb() {
    command -v "$1" >/dev/null 2>&1 || install_deb "$2"
}

# need_build_tools: what Pingora's build needs besides Rust (a C toolchain, make, and cmake for
# zlib-ng under flate2).
need_build_tools() {
    command -v cc >/dev/null 2>&1 && command -v make >/dev/null 2>&1 || install_deb build-essential
    need_deb cmake cmake
}

# need_rust [fmt] [clippy]: cargo, and the named components.
need_rust() {
    if ! command -v cargo >/dev/null 2>&1; then
        echo "error: cargo is missing. Install the Rust toolchain (https://rustup.rs) first." >&2
        exit 1
    fi
    local c
    for c in "$@"; do
        if ! cargo "$c" --version >/dev/null 2>&1; then
            echo "error: 'cargo $c' is missing. Install it with: rustup component add $( [ "$c" = fmt ] && echo rustfmt || echo "$c" )" >&2
            exit 1
        fi
    done
}
