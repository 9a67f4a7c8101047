//! Small shared pieces of the benchmark's programs.

use std::net::SocketAddr;

/// `--name value` from the command line, or the default.
pub fn arg(name: &str, default: &str) -> String {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1).cloned())
        .unwrap_or_else(|| default.to_string())
}

pub fn arg_num<T: std::str::FromStr>(name: &str, default: T) -> T {
    let v = arg(name, "");
    if v.is_empty() {
        return default;
    }
    v.parse()
        .unwrap_or_else(|_| panic!("{name}: not a number: {v}"))
}

pub fn arg_addr(name: &str, default: &str) -> SocketAddr {
    let v = arg(name, default);
    v.parse()
        .unwrap_or_else(|_| panic!("{name}: not an address: {v}"))
}

/// A listener with a deep backlog: the stream test opens thousands of connections at once.
pub fn listen(addr: SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    let s = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    s.set_reuseaddr(true)?;
    s.bind(addr)?;
    s.listen(8192)
}

pub fn runtime(threads: usize) -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads)
        .enable_all()
        .build()
        .expect("tokio runtime")
}
