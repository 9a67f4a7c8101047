//! A real headless browser for the admin page's tests: Debian's Chromium, driven through
//! ChromeDriver's W3C WebDriver protocol (plain JSON over HTTP on loopback; scripts/test.sh
//! installs `chromium` and `chromium-driver`). Both are stopped when the handle drops.

use std::io::Write;
use std::net::{SocketAddr, TcpStream};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use super::{free_port, read_response, Proc, PATIENCE};

pub struct Browser {
    driver: Proc,
    addr: SocketAddr,
    session: String,
    _profile: tempfile::TempDir,
}

/// One WebDriver command: `method path` with a JSON body; the answer's `value`.
fn command(
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: Option<&Value>,
) -> Result<Value, String> {
    let mut s = TcpStream::connect(addr).map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(PATIENCE * 3)).unwrap();
    let body = body.map(|b| b.to_string()).unwrap_or_default();
    // ChromeDriver takes only loopback hosts.
    let head = format!(
        "{method} {path} HTTP/1.1\r\nhost: {addr}\r\ncontent-type: application/json\r\n\
         content-length: {}\r\nconnection: close\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes()).map_err(|e| e.to_string())?;
    s.write_all(body.as_bytes()).map_err(|e| e.to_string())?;
    let r = read_response(&mut s, usize::MAX);
    let v: Value = serde_json::from_slice(&r.body).map_err(|e| format!("{e}: {r:?}"))?;
    if r.status != 200 {
        return Err(format!("{method} {path}: {}", v["value"]));
    }
    Ok(v["value"].clone())
}

impl Browser {
    pub fn start() -> Browser {
        let port = free_port();
        let child = Command::new("chromedriver")
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect(
                "chromedriver is missing: scripts/test.sh installs it (Debian packages chromium \
                 and chromium-driver)",
            );
        let driver = Proc { child };
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let start = Instant::now();
        while !command(addr, "GET", "/status", None).is_ok_and(|v| v["ready"] == true) {
            assert!(start.elapsed() < PATIENCE, "chromedriver did not start");
            std::thread::sleep(Duration::from_millis(50));
        }
        let profile = tempfile::tempdir().unwrap();
        let caps = json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "unhandledPromptBehavior": "ignore",
            "goog:chromeOptions": {
                "binary": "/usr/bin/chromium",
                "args": [
                    "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                    "--window-size=1280,900", "--no-first-run", "--disable-extensions",
                    format!("--user-data-dir={}", profile.path().display()),
                ],
            },
        }}});
        let v = command(addr, "POST", "/session", Some(&caps)).expect("a browser session");
        Browser {
            driver,
            addr,
            session: v["sessionId"].as_str().unwrap().to_string(),
            _profile: profile,
        }
    }

    fn cmd(&self, method: &str, path: &str, body: Option<&Value>) -> Result<Value, String> {
        command(
            self.addr,
            method,
            &format!("/session/{}{path}", self.session),
            body,
        )
    }

    pub fn goto(&self, url: &str) {
        self.cmd("POST", "/url", Some(&json!({ "url": url })))
            .unwrap_or_else(|e| panic!("{url}: {e}"));
    }

    /// Runs `script` (a function body; `return` gives the value) in the page.
    pub fn js(&self, script: &str) -> Value {
        self.cmd(
            "POST",
            "/execute/sync",
            Some(&json!({ "script": script, "args": [] })),
        )
        .unwrap_or_else(|e| panic!("{script}: {e}"))
    }

    /// Waits until `script` returns true.
    pub fn wait(&self, what: &str, script: &str) {
        let start = Instant::now();
        while self.js(script) != Value::Bool(true) {
            assert!(
                start.elapsed() < PATIENCE,
                "the page never showed {what}; it shows: {}",
                self.js("return document.body ? document.body.innerText : ''")
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits until the view `name` has rendered its data (`data-ready` on `main#view`).
    pub fn wait_view(&self, name: &str) {
        self.wait(
            &format!("the {name} view"),
            &format!(
                "const v = document.getElementById('view'); \
                 return !!v && v.dataset.view === '{name}' && v.dataset.ready === '1';"
            ),
        );
    }

    /// The text of an open alert, if one is open.
    pub fn alert(&self) -> Option<String> {
        self.cmd("GET", "/alert/text", None)
            .ok()
            .and_then(|v| v.as_str().map(str::to_string))
    }

    /// A PNG of the window, base64.
    pub fn screenshot_base64(&self) -> String {
        self.cmd("GET", "/screenshot", None)
            .unwrap()
            .as_str()
            .unwrap()
            .to_string()
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.cmd("DELETE", "", None);
        let _ = &self.driver;
    }
}
