//! The floor of tokentap's own design: a Pingora HTTP proxy that forwards everything to one
//! upstream and does nothing else (no inspection, no metering, no logging). Same Pingora
//! version, same server settings and same allocator as tokentap's (`src/server.rs`,
//! `src/main.rs`), so the distance between the two is what tokentap's metering costs.
//!
//! `bare-pingora --listen 127.0.0.1:18001 --upstream 127.0.0.1:18000 --threads 1`
//! (`--l4-read-buffer BYTES` and `--l4-write-buffer BYTES` set the listener's buffers, Pingora's
//! defaults otherwise.)

use std::net::SocketAddr;

use async_trait::async_trait;
use pingora::listeners::{L4BufferSettings, ListenerConfig};
use pingora::prelude::*;
use pingora::server::configuration::ServerConf;
use tokentap_bench::{arg, arg_addr, arg_num};

/// tokentap's allocator (mimalloc without transparent huge pages, tokentap's default build).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

struct Bare {
    upstream: SocketAddr,
}

#[async_trait]
impl ProxyHttp for Bare {
    type CTX = ();

    fn new_ctx(&self) {}

    async fn upstream_peer(&self, _session: &mut Session, _ctx: &mut ()) -> Result<Box<HttpPeer>> {
        Ok(Box::new(HttpPeer::new(self.upstream, false, String::new())))
    }
}

fn main() {
    let listen = arg_addr("--listen", "127.0.0.1:18001");
    let upstream = arg_addr("--upstream", "127.0.0.1:18000");
    let conf = ServerConf {
        threads: arg_num("--threads", 1usize),
        grace_period_seconds: Some(0),
        graceful_shutdown_timeout_seconds: Some(1),
        upstream_keepalive_pool_size: 1024,
        ..ServerConf::default()
    };
    let mut server = Server::new_with_opt_and_conf(None, conf);
    let mut proxy = http_proxy_service(&server.configuration, Bare { upstream });
    let mut endpoint = ListenerConfig::tcp(listen.to_string());
    let mut buffers = L4BufferSettings::default();
    if let Ok(read) = arg("--l4-read-buffer", "").parse::<usize>() {
        buffers = buffers.read(read);
    }
    if let Ok(write) = arg("--l4-write-buffer", "").parse::<usize>() {
        buffers = buffers.write(write);
    }
    endpoint = endpoint.l4_buffer(buffers);
    proxy.add_listener(endpoint);
    server.add_service(proxy);
    server.bootstrap();
    println!("bare-pingora listening on {listen}, upstream {upstream}");
    server.run_forever();
}
