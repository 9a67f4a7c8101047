//! Holds many streaming calls open at once, to measure a proxy's memory with them open.
//!
//! Opens `--n` connections to `--target`, sends each a streaming chat request whose chunks come
//! `--delay-us` apart, and waits until every one has received its first body bytes (the stream
//! is open end to end). Then it prints `open N` and reads every stream to its end, and prints
//! `done OK FAILED`. A stream that fails counts as failed; the exit code is 1 if any did.
//!
//! `hold-streams --target 127.0.0.1:18001 --n 5000 --delay-us 500000 --chunks 20`

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use tokentap_bench::{arg, arg_addr, arg_num, runtime};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{Barrier, Semaphore};

async fn one(
    target: SocketAddr,
    req: Arc<Vec<u8>>,
    connecting: Arc<Semaphore>,
    opened: Arc<Barrier>,
) -> Result<(), String> {
    let permit = connecting.acquire().await.map_err(|e| e.to_string())?;
    let mut tcp = tokio::net::TcpStream::connect(target)
        .await
        .map_err(|e| format!("connect: {e}"))?;
    tcp.write_all(&req)
        .await
        .map_err(|e| format!("write: {e}"))?;
    let mut buf = vec![0u8; 16 * 1024];
    let mut seen = Vec::new();
    // The head and the first chunk: the stream is open.
    loop {
        let n = tcp.read(&mut buf).await.map_err(|e| format!("read: {e}"))?;
        if n == 0 {
            return Err("closed before the first chunk".into());
        }
        seen.extend_from_slice(&buf[..n]);
        if let Some(at) = memchr::memmem::find(&seen, b"\r\n\r\n") {
            if !seen.starts_with(b"HTTP/1.1 200") {
                return Err(String::from_utf8_lossy(&seen[..at]).into_owned());
            }
            if memchr::memmem::find(&seen[at..], b"data: ").is_some() {
                break;
            }
        }
    }
    drop(permit);
    opened.wait().await;
    loop {
        if memchr::memmem::find(&seen, b"data: [DONE]").is_some() {
            return Ok(());
        }
        let n = tcp.read(&mut buf).await.map_err(|e| format!("read: {e}"))?;
        if n == 0 {
            return Err("closed before [DONE]".into());
        }
        // Only the tail matters for finding [DONE] across reads.
        let keep = seen.len().saturating_sub(16);
        seen.drain(..keep);
        seen.extend_from_slice(&buf[..n]);
    }
}

fn main() {
    let target = arg_addr("--target", "127.0.0.1:18001");
    let n = arg_num("--n", 5000usize);
    let delay = arg_num("--delay-us", 500_000u64);
    let chunks = arg_num("--chunks", 20u64);
    let auth = arg("--authorization", "Bearer sk-bench");
    let body = r#"{"model":"bench/model","stream":true,"user":"hold","messages":[{"role":"user","content":"Hold this stream open."}]}"#;
    let req = Arc::new(
        format!(
            "POST /v1/chat/completions HTTP/1.1\r\nhost: {target}\r\nauthorization: {auth}\r\ncontent-type: application/json\r\nx-bench-chunks: {chunks}\r\nx-bench-delay-us: {delay}\r\ncontent-length: {}\r\n\r\n{body}",
            body.len()
        )
        .into_bytes(),
    );
    let ok = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    runtime(1).block_on(async {
        let connecting = Arc::new(Semaphore::new(256));
        // Everyone, plus this task, which prints when all are open.
        let opened = Arc::new(Barrier::new(n + 1));
        let mut tasks = Vec::with_capacity(n);
        for _ in 0..n {
            let (req, connecting, opened) = (req.clone(), connecting.clone(), opened.clone());
            let (ok, failed) = (ok.clone(), failed.clone());
            tasks.push(tokio::spawn(async move {
                match one(target, req, connecting, opened.clone()).await {
                    Ok(()) => ok.fetch_add(1, Ordering::Relaxed),
                    Err(e) => {
                        eprintln!("stream failed: {e}");
                        failed.fetch_add(1, Ordering::Relaxed)
                    }
                };
            }));
        }
        // A failed stream never reaches the barrier: wait for the open ones or for failures.
        tokio::select! {
            _ = opened.wait() => println!("open {n}"),
            _ = async {
                loop {
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    if failed.load(Ordering::Relaxed) > 0 { break; }
                }
            } => {
                // The others wait at the barrier for ever: report and stop.
                println!("open failed {}", failed.load(Ordering::Relaxed));
                std::process::exit(1);
            }
        }
        for t in tasks {
            let _ = t.await;
        }
    });
    let (ok, failed) = (ok.load(Ordering::Relaxed), failed.load(Ordering::Relaxed));
    println!("done {ok} {failed}");
    std::process::exit(i32::from(failed > 0));
}
