//! The admin page in a real headless browser (Debian's Chromium through ChromeDriver), on the
//! real binary after traffic made here: the overview and budgets show the ledger's figures, a
//! user's page lists their calls, a slow stream comes and goes on the live view, a user id
//! made of markup shows as text and runs nothing, and with a token the page shows only the
//! login until it is given.

mod common;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use common::browser::Browser;
use common::*;
use serde_json::Value;

const MODEL: &str = "anthropic/claude-opus-4.6";
const XSS: &str = "<img src=x onerror=alert(1)>";

fn page(tap: &Tap, route: &str) -> String {
    format!("http://{}/#/{route}", tap.admin)
}

/// Waits until the ledger has `n` calls (the file is written every flush interval).
fn wait_ledger(tap: &Tap, n: u64, headers: &[(&str, &str)]) {
    let start = Instant::now();
    loop {
        let v = request(tap.admin, "GET", "/admin/api/overview", headers, b"").json();
        let today = v["periods"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["name"] == "today")
            .unwrap()["calls"]
            .as_u64()
            .unwrap();
        if today == n {
            return;
        }
        assert!(start.elapsed() < PATIENCE, "the ledger never had {n} calls");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn call(tap: &Tap, user: &str) -> Value {
    let body = serde_json::json!({
        "model": MODEL, "user": user,
        "messages": [{"role": "user", "content": "Say something about tokens."}],
    });
    let r = post_chat(tap.addr, &[], body.to_string().as_bytes());
    assert_eq!(r.status, 200);
    r.json()
}

#[test]
fn the_page_shows_the_ledgers_figures_a_users_calls_and_markup_as_text() {
    let mock = Mock::start();
    let tap = Tap::start(
        &mock.url(),
        &format!(
            "{TEST_PRICING}\n[budgets.default]\ndaily = {{ usd = 1.00, soft_usd = 0.00001 }}\n\
             [budgets.teams.research]\nmembers = [\"alice\", \"bob\"]\ncaps = {{ monthly = {{ usd = 20.00 }} }}\n"
        ),
    );
    for user in ["alice", "alice", "alice", "bob", XSS] {
        call(&tap, user);
    }
    let records = tap.wait_records(5);
    let mut by_user: BTreeMap<String, u64> = BTreeMap::new();
    for r in &records {
        *by_user
            .entry(r["user"].as_str().unwrap().to_string())
            .or_default() += pico_of(r);
    }
    let total: u64 = by_user.values().sum();
    wait_ledger(&tap, 5, &[]);

    let b = Browser::start();
    b.goto(&page(&tap, ""));
    b.wait_view("overview");
    // The period cards: the exact figures the ledger holds.
    for period in ["today", "week", "month"] {
        let v = b.js(&format!(
            "const s = document.querySelector('section[data-period={period}]'); \
             return [s.querySelector('[data-field=cost_usd]').dataset.value, \
                     s.querySelector('[data-field=calls]').dataset.value, \
                     s.querySelector('[data-field=cost_usd]').textContent];"
        ));
        assert_eq!(pico_of_usd(&v[0]), total, "{period}");
        assert_eq!(v[1], "5", "{period}");
        assert!(v[2].as_str().unwrap().starts_with('$'), "{v}");
    }
    // Top users: every user with their spend, the markup one as its literal text.
    let top = b.js(
        "return [...document.querySelectorAll('table[data-top=users] tr[data-name]')].map(r => \
         [r.dataset.name, r.querySelector('[data-field=cost_usd]').dataset.value, \
          r.querySelector('a').textContent]);",
    );
    let shown: BTreeMap<String, u64> = top
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            assert_eq!(r[0], r[2], "the link shows the user id as text");
            (r[0].as_str().unwrap().to_string(), pico_of_usd(&r[1]))
        })
        .collect();
    assert_eq!(shown, by_user);
    // Nothing ran: no element made of the user id, no alert.
    assert_eq!(b.js("return document.querySelectorAll('img').length"), 0);
    assert_eq!(b.alert(), None);

    // Budgets: each user's and the team's spend in its window, as the ledger has it.
    b.goto(&page(&tap, "budgets"));
    b.wait_view("budgets");
    let rows = b.js(
        "return [...document.querySelectorAll('tr[data-kind]')].map(r => [r.dataset.kind, \
         r.dataset.name, r.dataset.state, r.querySelector('[data-field=spent_usd]').dataset.value]);",
    );
    let rows = rows.as_array().unwrap();
    assert_eq!(rows.len(), 4, "{rows:?}");
    for r in rows {
        let (kind, name, state) = (r[0].as_str().unwrap(), r[1].as_str().unwrap(), &r[2]);
        let want = if kind == "team" {
            by_user["alice"] + by_user["bob"]
        } else {
            by_user[name]
        };
        assert_eq!(pico_of_usd(&r[3]), want, "{name}");
        if kind == "user" {
            assert_eq!(state, "soft", "{name} passed the soft threshold");
        }
    }
    assert_eq!(
        b.js("return document.querySelectorAll('tr.soft').length"),
        3,
        "soft thresholds passed stand out"
    );
    assert_eq!(b.js("return document.querySelectorAll('img').length"), 0);
    assert!(b
        .js("return [...document.querySelectorAll('tr[data-kind] a')].map(a => a.textContent)")
        .as_array()
        .unwrap()
        .contains(&Value::String(XSS.into())));
    // The filter narrows the list.
    b.js(
        "const f = document.getElementById('budget-filter'); f.value = 'bo'; \
         f.dispatchEvent(new Event('input', {bubbles: true}));",
    );
    b.wait(
        "only bob",
        "const r = [...document.querySelectorAll('tr[data-kind]')]; \
         return document.getElementById('view').dataset.ready === '1' && r.length === 1 && \
         r[0].dataset.name === 'bob';",
    );

    // A user's page lists their calls, newest first.
    b.goto(&page(&tap, "users/alice"));
    b.wait_view("user");
    let ids = b.js(
        "return [...document.querySelectorAll('tr[data-request-id]')].map(r => r.dataset.requestId);",
    );
    let mut want: Vec<&str> = records
        .iter()
        .filter(|r| r["user"] == "alice")
        .map(|r| r["request_id"].as_str().unwrap())
        .collect();
    want.reverse();
    assert_eq!(ids, serde_json::json!(want));

    // The markup user's own page: the id is the heading's text.
    let enc: String = XSS
        .bytes()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                (c as char).to_string()
            } else {
                format!("%{c:02X}")
            }
        })
        .collect();
    b.goto(&page(&tap, &format!("users/{enc}")));
    b.wait_view("user");
    assert_eq!(
        b.js("return document.querySelector('h1[data-field=name]').textContent"),
        XSS
    );
    assert_eq!(b.js("return document.querySelectorAll('img').length"), 0);
    assert_eq!(
        b.js("return document.querySelectorAll('tr[data-request-id]').length"),
        1
    );
    assert_eq!(b.alert(), None);
}

#[test]
fn a_slow_stream_shows_on_the_live_view_until_it_ends() {
    let mock = Mock::start();
    let tap = Tap::start(&mock.url(), TEST_PRICING);
    let b = Browser::start();
    b.goto(&page(&tap, "live"));
    b.wait_view("live");
    assert_eq!(
        b.js("return document.querySelectorAll('tr[data-request-id]').length"),
        0
    );
    let addr = tap.addr;
    let stream = std::thread::spawn(move || {
        post_chat(
            addr,
            &[("x-mock-chunks", "80"), ("x-mock-delay-ms", "60")],
            &chat_body(MODEL, "streamer", true, ""),
        )
    });
    b.wait(
        "the stream on the live view",
        "return [...document.querySelectorAll('tr[data-request-id]')].some(r => \
         r.textContent.includes('streamer'));",
    );
    let r = stream.join().unwrap();
    assert_eq!(r.status, 200);
    let id = tap.wait_records(1)[0]["request_id"]
        .as_str()
        .unwrap()
        .to_string();
    b.wait(
        "the stream gone from the live view",
        &format!(
            "const v = document.getElementById('view'); return v.dataset.ready === '1' && \
             !document.querySelector('tr[data-request-id=\"{id}\"]') && \
             document.querySelectorAll('tr[data-request-id]').length === 0;"
        ),
    );
}

#[test]
fn with_a_token_the_page_shows_the_login_and_no_data_until_it_is_given() {
    let mock = Mock::start();
    let token = "browser-admin-token-0123";
    let tap = TapBuilder::new(&mock.url())
        .extra(TEST_PRICING)
        .env("TT_ADMIN_TOKEN", token)
        .start_with_server_extra("admin_token_env = \"TT_ADMIN_TOKEN\"\n");
    call(&tap, "secret-spender");
    let bearer = format!("Bearer {token}");
    wait_ledger(&tap, 1, &[("authorization", &bearer)]);

    let b = Browser::start();
    b.goto(&page(&tap, ""));
    b.wait_view("login");
    let text = b.js("return document.body.innerText").to_string();
    assert!(!text.contains("secret-spender"), "{text}");
    assert!(!text.contains('$'), "no figures: {text}");
    assert!(!b.js("return location.href").to_string().contains(token));
    // A wrong token is refused and stays on the login.
    let submit = |t: &str| {
        b.js(&format!(
            "const f = document.getElementById('login'); f.querySelector('input[name=token]').value = '{t}'; \
             f.requestSubmit();"
        ))
    };
    submit("wrong-token-0000000000");
    b.wait(
        "a refused login",
        "return /wrong/i.test(document.getElementById('login').textContent);",
    );
    assert_eq!(
        b.js("return document.getElementById('view').dataset.view"),
        "login"
    );
    submit(token);
    b.wait_view("overview");
    assert!(b
        .js("return document.body.innerText")
        .to_string()
        .contains("secret-spender"));
    // The session cookie is out of the page's reach, and the token is in no URL.
    assert_eq!(b.js("return document.cookie"), "");
    assert!(!b.js("return location.href").to_string().contains(token));
}
