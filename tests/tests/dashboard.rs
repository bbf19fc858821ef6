//! The web dashboard in headless Chromium (driven over its DevTools protocol)
//! against real nodes: every page loads without errors and with named controls, a
//! client `mosquitto_sub` connected is found and kicked, a retained message
//! `mosquitto_pub` set is browsed to and deleted, the topic tester round-trips
//! messages over the WebSocket listener, the back button and deep links work, and a
//! node with an API token asks for it. Screenshots of each page are written under
//! `target/tmp/dashboard-screenshots/` (the path is printed).

use std::path::PathBuf;
use std::time::Duration;

use flockmq_tests::browser::Browser;
use flockmq_tests::{free_port, run, wait_until, Background, Node};

/// Generous: the machine running the tests may be slow and busy.
const T: Duration = Duration::from_secs(30);

/// Every page of the dashboard, by its hash route.
const PAGES: [&str; 6] = [
    "cluster",
    "clients",
    "subscriptions",
    "retained",
    "charts",
    "tester",
];

/// Helpers the test's JavaScript uses: a control by its label's text, a button by
/// its text or accessible name, the controls without an accessible name, and
/// setting an input's value as typing would.
const HELPERS: &str = r#"
window.t = {
  field(label) {
    const l = [...document.querySelectorAll('main label')].find((l) => l.textContent.trim() === label);
    return l && document.getElementById(l.htmlFor);
  },
  button(name) {
    return [...document.querySelectorAll('main button')].find((b) =>
      b.getAttribute('aria-label') === name || b.textContent.trim() === name);
  },
  set(label, value) {
    const f = t.field(label);
    f.value = value;
    f.dispatchEvent(new Event('input', { bubbles: true }));
    return true;
  },
  click(name) { const b = t.button(name); if (!b || b.disabled) return false; b.click(); return true; },
  unnamed() {
    return [...document.querySelectorAll('button, input, select, textarea, a')]
      .filter((c) => !c.closest('[hidden]'))
      .filter((c) => {
        if (c.getAttribute('aria-label')) return false;
        if ((c.labels && c.labels.length) ) return false;
        if (c.tagName === 'BUTTON' || c.tagName === 'A') return c.textContent.trim() === '';
        return true;
      })
      .map((c) => c.outerHTML.slice(0, 80));
  },
  text() { return document.getElementById('main').innerText; },
};
true
"#;

struct Screenshots(PathBuf);

impl Screenshots {
    fn new() -> Screenshots {
        let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("dashboard-screenshots");
        std::fs::create_dir_all(&dir).expect("screenshot directory");
        eprintln!("dashboard screenshots in {}", dir.display());
        Screenshots(dir)
    }

    fn take(&self, browser: &mut Browser, name: &str) {
        browser.screenshot(&self.0.join(format!("{name}.png")));
    }
}

/// Open `route` (a hash route, loaded afresh when `reload`) and wait until its page
/// `page` shows its first data.
fn open(browser: &mut Browser, base: &str, route: &str, page: &str, reload: bool) {
    if reload {
        browser.navigate("about:blank");
        browser.navigate(&format!("{base}#/{route}"));
    } else {
        browser.eval(&format!("location.hash = '#/{route}'; true"));
    }
    browser.wait_for_js(
        &format!("the {page} page"),
        T,
        &format!("document.getElementById('main')?.dataset.ready === '{page}'"),
    );
    browser.eval(HELPERS);
}

/// Assert that the page reported no error so far and that every control on it has
/// an accessible name.
fn assert_clean(browser: &mut Browser, page: &str) {
    let errors = browser.console_errors();
    assert!(
        errors.is_empty(),
        "the {page} page reported errors: {errors:#?}"
    );
    let unnamed = browser.eval("t.unnamed()");
    assert_eq!(
        unnamed,
        serde_json::json!([]),
        "controls without an accessible name on the {page} page"
    );
}

fn main_text_has(browser: &mut Browser, what: &str, text: &str) {
    browser.wait_for_js(
        what,
        T,
        &format!("t.text().includes({})", serde_json::json!(text)),
    );
}

fn publish(node: &Node, args: &[&str]) {
    let port = node.mqtt_port.to_string();
    let mut all = vec!["-p", port.as_str(), "-q", "1"];
    all.extend_from_slice(args);
    let r = run("mosquitto_pub", &all, T);
    assert_eq!(r.code, Some(0), "{r:?}");
}

#[test]
fn the_dashboard_shows_a_three_node_cluster_kicks_a_client_deletes_a_retained_message_and_round_trips_through_the_tester(
) {
    let ws_ports: Vec<u16> = (0..3).map(|_| free_port()).collect();
    let nodes = Node::cluster_with_node_env(3, &[], |id| {
        vec![(
            "FLOCKMQ_WS_ADDR".to_owned(),
            format!("127.0.0.1:{}", ws_ports[id - 1]),
        )]
    });
    // Something to show: a subscriber on node 2, a shared subscription on node 3, a
    // retained message set through node 3.
    let node2_port = nodes[1].mqtt_port.to_string();
    let watcher = Background::spawn(
        "mosquitto_sub",
        &[
            "-p",
            &node2_port,
            "-V",
            "5",
            "-i",
            "dash-watcher",
            "-t",
            "plant/#",
        ],
    );
    let node3_port = nodes[2].mqtt_port.to_string();
    let worker = Background::spawn(
        "mosquitto_sub",
        &[
            "-p",
            &node3_port,
            "-i",
            "dash-worker",
            "-t",
            "$share/workers/jobs/#",
        ],
    );
    nodes[0].wait_subscribed("dash-watcher", "plant/#");
    nodes[0].wait_subscribed("dash-worker", "$share/workers/jobs/#");
    publish(
        &nodes[2],
        &["-t", "plant/line1/status", "-m", "running", "-r"],
    );
    wait_until("the retained message on node 1", T, || {
        nodes[0]
            .api("GET", "/retained/plant/line1/status", None)
            .is_ok()
    });

    let shots = Screenshots::new();
    let base = format!("http://127.0.0.1:{}/", nodes[0].http_port);
    let mut browser = Browser::launch();
    // A deep link, loaded afresh.
    browser.navigate(&format!("{base}#/clients?like=dash-watcher"));
    browser.wait_for_js("the dashboard's scripts", T, "!!window.MqttClient");
    browser.eval(HELPERS);
    browser.wait_for_js(
        "the clients page from a deep link",
        T,
        "document.getElementById('main')?.dataset.ready === 'clients'",
    );
    assert_eq!(
        browser.eval("t.field('Search clients').value"),
        "dash-watcher"
    );

    // Every page, through the navigation the page itself does (hash routes).
    for page in PAGES {
        open(&mut browser, &base, page, page, false);
        match page {
            "cluster" => {
                main_text_has(&mut browser, "the leader", "leader");
                browser.wait_for_js(
                    "three healthy nodes",
                    T,
                    "[...document.querySelectorAll('main .badge')].filter((b) => b.textContent === 'healthy').length === 3",
                );
                // The retained message published on node 3 went to node 2's client.
                main_text_has(
                    &mut browser,
                    "node 3's forwarding to node 2",
                    "node 3 → node 2",
                );
            }
            "subscriptions" => {
                main_text_has(&mut browser, "the subscription", "plant/#");
                main_text_has(&mut browser, "the shared group", "workers");
            }
            "charts" => {
                browser.wait_for_js(
                    "the rate lines",
                    T,
                    "document.querySelectorAll('main svg polyline').length === 3",
                );
            }
            _ => {}
        }
        assert_clean(&mut browser, page);
        shots.take(&mut browser, page);
    }

    // The back button returns to the previous page.
    browser.eval("history.back(); true");
    browser.wait_for_js(
        "the charts page again after going back",
        T,
        "document.getElementById('main')?.dataset.ready === 'charts'",
    );

    // The mosquitto_sub client appears, with its detail, and is kicked.
    open(&mut browser, &base, "clients", "clients", true);
    browser.eval(HELPERS);
    browser.eval(
        "t.set('Search clients', 'dash-watcher'); t.field('Search clients').form.requestSubmit(); true",
    );
    browser.wait_for_js(
        "the search in the address",
        T,
        "location.hash.includes('like=dash-watcher')",
    );
    main_text_has(&mut browser, "dash-watcher on node 2", "node 2");
    browser.eval("document.querySelector('main a[href=\"#/clients/dash-watcher\"]').click(); true");
    browser.wait_for_js(
        "the client's detail",
        T,
        "document.getElementById('main')?.dataset.ready === 'clients-detail'",
    );
    main_text_has(&mut browser, "its subscription", "plant/#");
    assert_clean(&mut browser, "client detail");
    shots.take(&mut browser, "client-detail");
    assert_eq!(browser.eval("t.click('Kick dash-watcher')"), true);
    browser.wait_for_js(
        "the kick's notice",
        T,
        "document.getElementById('toast').textContent.includes('kicked')",
    );
    // A v5 mosquitto_sub ends when the broker disconnects it (0x98).
    let kicked = watcher.finish(T);
    assert_eq!(
        kicked.code,
        Some(0),
        "mosquitto_sub ends when kicked: {kicked:?}"
    );
    nodes[0].wait_no_session("dash-watcher");
    main_text_has(&mut browser, "no session any more", "No session");

    // The retained message is found by its prefix, viewed and deleted.
    open(
        &mut browser,
        &base,
        "retained?prefix=plant/",
        "retained",
        false,
    );
    main_text_has(&mut browser, "the retained topic", "plant/line1/status");
    browser.wait_for_js(
        "the level below the prefix",
        T,
        "[...document.querySelectorAll('main .levels a')].some((a) => a.textContent === 'line1/')",
    );
    assert!(browser
        .eval("t.click('View retained plant/line1/status')")
        .as_bool()
        .unwrap_or(false));
    browser.wait_for_js(
        "the payload",
        T,
        "[...document.querySelectorAll('main pre.payload')].some((p) => p.textContent === 'running')",
    );
    assert!(browser
        .eval("t.click('Delete retained plant/line1/status')")
        .as_bool()
        .unwrap_or(false));
    main_text_has(
        &mut browser,
        "the empty list",
        "No retained message under plant/",
    );
    wait_until("the deletion on node 3", T, || {
        nodes[2]
            .api("GET", "/retained/plant/line1/status", None)
            .is_err_and(|e| e.starts_with("404"))
    });
    assert_clean(&mut browser, "retained");

    // The topic tester connects over node 1's WebSocket listener, subscribes, and
    // gets its own message and one published through node 3.
    open(&mut browser, &base, "tester", "tester", false);
    assert_eq!(
        browser.eval("t.field('WebSocket URL').value"),
        format!("ws://127.0.0.1:{}/mqtt", ws_ports[0])
    );
    browser.eval("t.set('Client id', 'dash-tester'); t.click('Connect')");
    browser.wait_for_js(
        "the tester connected",
        T,
        "document.getElementById('tester-state').textContent === 'connected'",
    );
    browser.eval("t.set('Topic filter', 'echo/#'); t.click('Subscribe')");
    browser.wait_for_js(
        "the tester's subscription",
        T,
        "document.getElementById('main').dataset.subscribed === 'echo/#'",
    );
    browser.eval(
        "t.set('Topic', 'echo/self'); t.set('Payload', 'ping from the page'); \
         t.field('Publish QoS').value = '1'; t.click('Publish')",
    );
    browser.wait_for_js(
        "the tester's own message",
        T,
        "[...document.querySelectorAll('main .log li')].some((li) => li.textContent === 'echo/selfping from the page')",
    );
    publish(&nodes[2], &["-t", "echo/node3", "-m", "hello from node 3"]);
    browser.wait_for_js(
        "the message published through node 3",
        T,
        "[...document.querySelectorAll('main .log li')].some((li) => li.textContent === 'echo/node3hello from node 3')",
    );
    assert_clean(&mut browser, "tester");
    shots.take(&mut browser, "tester-round-trip");

    // The charts show the traffic of the test.
    open(&mut browser, &base, "charts", "charts", false);
    browser.wait_for_js(
        "some traffic in the chart",
        T,
        "[...document.querySelectorAll('main svg polyline.received, main svg polyline.sent')]\
         .some((p) => p.getAttribute('points').split(' ').some((xy) => Number(xy.split(',')[1]) < 211))",
    );
    assert_clean(&mut browser, "charts");
    drop(worker.kill());
}

#[test]
fn a_node_with_an_api_token_asks_for_it_before_the_dashboard() {
    let node = Node::start_with_config("api_token = \"s3cret token\"\n");
    let base = format!("http://127.0.0.1:{}/", node.http_port);
    let refused = ureq::get(&base).call();
    assert!(
        matches!(refused, Err(ureq::Error::Status(401, _))),
        "{refused:?}"
    );
    let mut browser = Browser::launch();
    browser.navigate(&base);
    browser.wait_for_js(
        "the sign-in form",
        T,
        "!!document.querySelector('form[action=\"/login\"] input[name=token]')",
    );
    // A wrong token is refused, the right one opens the dashboard.
    browser.eval(
        "document.getElementById('token').value = 'wrong'; \
         document.querySelector('form[action=\"/login\"]').submit(); true",
    );
    browser.wait_for_js(
        "the refusal",
        T,
        "document.querySelector('.notice')?.textContent.includes('not the API')",
    );
    browser.eval(
        "document.getElementById('token').value = 's3cret token'; \
         document.querySelector('form[action=\"/login\"]').submit(); true",
    );
    browser.wait_for_js(
        "the cluster page after signing in",
        T,
        "document.getElementById('main')?.dataset.ready === 'cluster'",
    );
    browser.wait_for_js(
        "this node as the leader",
        T,
        "document.getElementById('main').innerText.includes('leader')",
    );
    let errors: Vec<String> = browser
        .console_errors()
        .into_iter()
        // The two 401 answers of the sign-in page are the browser's to log.
        .filter(|e| !e.contains("401"))
        .collect();
    assert!(errors.is_empty(), "{errors:#?}");
    // Signing out forgets the token: the sign-in page again.
    browser.eval("document.querySelector('form[action=\"/logout\"] button').click(); true");
    browser.wait_for_js(
        "the sign-in form after signing out",
        T,
        "!!document.querySelector('form[action=\"/login\"] input[name=token]')",
    );
}

#[test]
fn a_node_with_basic_auth_users_has_the_browser_ask_for_one_before_the_dashboard() {
    let dir = tempfile::tempdir().expect("temp dir");
    let file = dir.path().join("api-users");
    let file_arg = file.to_str().expect("utf-8 path");
    let bin = flockmq_tests::broker_binary();
    let made = run(
        bin.to_str().expect("utf-8 path"),
        &["passwd", file_arg, "ops", "--password", "op-s3cret"],
        T,
    );
    assert_eq!(made.code, Some(0), "{made:?}");
    let node = Node::start_with(&["--api-password-file", file_arg]);
    let base = format!("http://127.0.0.1:{}", node.http_port);
    for path in ["/", "/dashboard/app.js", "/dashboard/mqtt.js"] {
        match ureq::get(&format!("{base}{path}")).call() {
            Err(ureq::Error::Status(401, r)) => assert_eq!(
                r.header("WWW-Authenticate"),
                Some("Basic realm=\"flockmq\""),
                "{path}"
            ),
            other => panic!("{path}: expected 401, got {other:?}"),
        }
        // ops:op-s3cret
        let page = ureq::get(&format!("{base}{path}"))
            .set("Authorization", "Basic b3BzOm9wLXMzY3JldA==")
            .call()
            .unwrap_or_else(|e| panic!("{path} with the user's credentials: {e}"));
        assert_eq!(page.status(), 200, "{path}");
        assert!(
            page.header("Content-Security-Policy")
                .is_some_and(|csp| csp.contains("script-src 'self'")),
            "{path}"
        );
    }
    // The stylesheet holds no data: the sign-in page uses it before anyone signs in.
    let style = ureq::get(&format!("{base}/dashboard/style.css")).call();
    assert!(style.is_ok_and(|r| r.status() == 200));
}
