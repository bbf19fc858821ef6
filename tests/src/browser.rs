//! Headless Chromium driven over its DevTools protocol (a WebSocket of JSON
//! messages), for the dashboard's test: load a page, run JavaScript in it, wait for
//! a condition in it, collect what it logged as errors, take screenshots.
//!
//! One page per [`Browser`]. Events arrive on the same socket as the answers to
//! commands, in order; they are read while waiting for an answer, so every error the
//! page logged before a command's answer is in [`Browser::console_errors`] after it.
//!
//! The program is `chromium` (Debian's package, installed by
//! `scripts/install-test-deps.sh`), or `$TEST_CHROMIUM`.

use std::net::TcpStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use base64::Engine;
use serde_json::{json, Value};
use tungstenite::stream::MaybeTlsStream;
use tungstenite::{Message, WebSocket};

use crate::wait_for;

/// How long one DevTools command may take to be answered.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(30);

/// A headless Chromium with one page open.
pub struct Browser {
    child: Child,
    socket: WebSocket<MaybeTlsStream<TcpStream>>,
    next_id: u64,
    errors: Vec<String>,
    _profile: tempfile::TempDir,
}

impl Browser {
    /// Start Chromium headless with a fresh profile and a laptop-sized window, and
    /// attach to its page.
    pub fn launch() -> Browser {
        let program = std::env::var("TEST_CHROMIUM").unwrap_or_else(|_| "chromium".into());
        let profile = tempfile::tempdir().expect("temp dir");
        let child = Command::new(&program)
            .args([
                "--headless=new",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-dev-shm-usage",
                "--no-first-run",
                "--no-default-browser-check",
                "--disable-extensions",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--password-store=basic",
                "--remote-debugging-address=127.0.0.1",
                "--remote-debugging-port=0",
                "--window-size=1366,900",
            ])
            .arg(format!("--user-data-dir={}", profile.path().display()))
            .arg("about:blank")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "cannot start {program} ({e}); install it with scripts/install-test-deps.sh \
                     or point TEST_CHROMIUM at a Chromium"
                )
            });
        // Chromium writes its DevTools port into the profile once it listens.
        let port_file = profile.path().join("DevToolsActivePort");
        let port: u16 = wait_for("Chromium's DevTools port", Duration::from_secs(60), || {
            let text = std::fs::read_to_string(&port_file).map_err(|e| e.to_string())?;
            text.lines()
                .next()
                .and_then(|l| l.trim().parse().ok())
                .ok_or_else(|| format!("no port yet in {text:?}"))
        });
        let page_url: String = wait_for("Chromium's page target", Duration::from_secs(30), || {
            let list: Value = ureq::get(&format!("http://127.0.0.1:{port}/json/list"))
                .timeout(Duration::from_secs(5))
                .call()
                .map_err(|e| e.to_string())?
                .into_json()
                .map_err(|e| e.to_string())?;
            list.as_array()
                .into_iter()
                .flatten()
                .find(|t| t["type"] == "page")
                .and_then(|t| t["webSocketDebuggerUrl"].as_str())
                .map(str::to_owned)
                .ok_or_else(|| format!("no page in {list}"))
        });
        let (socket, _) = tungstenite::connect(page_url.as_str()).expect("attach to the page");
        if let MaybeTlsStream::Plain(stream) = socket.get_ref() {
            stream
                .set_read_timeout(Some(COMMAND_TIMEOUT))
                .expect("read timeout");
        }
        let mut browser = Browser {
            child,
            socket,
            next_id: 0,
            errors: Vec::new(),
            _profile: profile,
        };
        for domain in ["Page.enable", "Runtime.enable", "Log.enable"] {
            browser.call(domain, json!({}));
        }
        browser
    }

    /// Send a DevTools command and return its result, keeping the events that come
    /// before it.
    pub fn call(&mut self, method: &str, params: Value) -> Value {
        self.try_call(method, params)
            .unwrap_or_else(|error| panic!("{method} failed: {error}"))
    }

    /// [`Browser::call`], with the browser's error answer as an `Err` (a command that
    /// raced a navigation, say).
    pub fn try_call(&mut self, method: &str, params: Value) -> Result<Value, Value> {
        self.next_id += 1;
        let id = self.next_id;
        let request = json!({ "id": id, "method": method, "params": params });
        self.socket
            .send(Message::text(request.to_string()))
            .unwrap_or_else(|e| panic!("send {method}: {e}"));
        loop {
            let message = self
                .socket
                .read()
                .unwrap_or_else(|e| panic!("no answer to {method}: {e}"));
            let Message::Text(text) = message else {
                continue;
            };
            let v: Value = serde_json::from_str(text.as_str()).expect("DevTools JSON");
            if v["id"] == id {
                if let Some(error) = v.get("error") {
                    return Err(error.clone());
                }
                return Ok(v["result"].clone());
            }
            self.note_event(&v);
        }
    }

    /// Keep what the page reports as an error: console.error, uncaught exceptions,
    /// and the browser's own error entries (a failed request, a blocked script).
    fn note_event(&mut self, v: &Value) {
        let params = &v["params"];
        match v["method"].as_str() {
            Some("Runtime.consoleAPICalled") if params["type"] == "error" => {
                let args: Vec<String> = params["args"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(|a| {
                        a["value"]
                            .as_str()
                            .map(str::to_owned)
                            .unwrap_or_else(|| a["description"].to_string())
                    })
                    .collect();
                self.errors
                    .push(format!("console.error: {}", args.join(" ")));
            }
            Some("Runtime.exceptionThrown") => {
                let d = &params["exceptionDetails"];
                self.errors.push(format!(
                    "exception: {} {}",
                    d["text"], d["exception"]["description"]
                ));
            }
            Some("Log.entryAdded") if params["entry"]["level"] == "error" => {
                let e = &params["entry"];
                self.errors
                    .push(format!("log: {} ({})", e["text"], e["url"]));
            }
            _ => {}
        }
    }

    /// Every error the page has reported so far.
    pub fn console_errors(&mut self) -> Vec<String> {
        // A round trip: whatever was reported before now has been read.
        self.eval("0");
        self.errors.clone()
    }

    /// Open `url` in the page.
    pub fn navigate(&mut self, url: &str) {
        self.call("Page.navigate", json!({ "url": url }));
    }

    /// The value of the JavaScript `expression` in the page (promises awaited).
    pub fn eval(&mut self, expression: &str) -> Value {
        let result = self.call(
            "Runtime.evaluate",
            json!({ "expression": expression, "awaitPromise": true, "returnByValue": true }),
        );
        if let Some(details) = result.get("exceptionDetails") {
            panic!("{expression} threw: {details}");
        }
        result["result"]["value"].clone()
    }

    /// Poll the JavaScript `expression` until its value is truthy (not null, false,
    /// 0 or ""), and return it; panic after `within` naming `what`.
    pub fn wait_for_js(&mut self, what: &str, within: Duration, expression: &str) -> Value {
        wait_for(what, within, || {
            // A page still navigating ("Inspected target navigated or closed") has no
            // answer yet: ask again.
            let result = self
                .try_call(
                    "Runtime.evaluate",
                    json!({ "expression": expression, "awaitPromise": true, "returnByValue": true }),
                )
                .map_err(|error| format!("{expression}: {error}"))?;
            if let Some(details) = result.get("exceptionDetails") {
                panic!("{expression} threw: {details}");
            }
            let v = result["result"]["value"].clone();
            let truthy = match &v {
                Value::Null => false,
                Value::Bool(b) => *b,
                Value::Number(n) => n.as_f64() != Some(0.0),
                Value::String(s) => !s.is_empty(),
                _ => true,
            };
            if truthy {
                Ok(v)
            } else {
                Err(format!("{expression} is {v}"))
            }
        })
    }

    /// Save a PNG of the page as it looks now to `path`.
    pub fn screenshot(&mut self, path: &Path) {
        let shot = self.call(
            "Page.captureScreenshot",
            json!({ "format": "png", "captureBeyondViewport": true }),
        );
        let png = base64::engine::general_purpose::STANDARD
            .decode(shot["data"].as_str().expect("screenshot data"))
            .expect("screenshot base64");
        std::fs::write(path, png).expect("write screenshot");
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
