//! Issue 24, budget alerts against the real binary and a webhook receiver started here: one
//! POST per threshold crossed, in tokentap's JSON and Slack's, also when the receiver fails
//! the first tries, and when tokentap restarts between the crossing and the delivery.
//! (Two replicas sharing Redis: tests/redis.rs.)

mod common;

use common::*;

/// A token cap of 200: calls of 14 prompt and 20 output tokens at worst pass 50 % and 80 %
/// as they settle, and the cap refuses one for what was spent (100 %).
const CAP: &str = "[budgets.users.al]\ndaily = { tokens = 200 }\n";

#[test]
fn each_threshold_is_posted_once_also_when_the_receiver_fails_first() {
    let mock = Mock::start();
    let hooks = Hooks::start(2);
    let tap = Tap::start(
        &mock.url(),
        &format!(
            "{TEST_PRICING}\n{CAP}{}",
            alerts_config(&hooks, "[0.5, 0.8, 1.0]")
        ),
    );
    calls_until_refused(&[tap.addr], "al");
    let generic = hooks.wait("/hook", 3);
    let slack = hooks.wait("/slack", 3);
    assert_eq!(thresholds_of(&generic), ["0.5", "0.8", "1"]);
    for a in &generic {
        assert_eq!(a["type"], "budget_alert");
        assert_eq!(
            a["subject"],
            serde_json::json!({"kind": "user", "name": "al"})
        );
        assert_eq!(
            (a["window"].as_str(), a["cap_tokens"].as_u64()),
            (Some("daily"), Some(200))
        );
        let spent = a["spent_tokens"].as_u64().unwrap();
        let t: f64 = a["threshold"].as_str().unwrap().parse().unwrap();
        assert!(spent as f64 >= t * 200.0 || t == 1.0, "{a}");
    }
    assert!(slack.iter().all(|s| s["text"]
        .as_str()
        .unwrap()
        .starts_with("tokentap: user al ")));
    assert!(
        hooks.attempts.load(std::sync::atomic::Ordering::SeqCst) >= 8,
        "the failures were retried"
    );
    for t in ["0.5", "0.8", "1"] {
        let series =
            format!("tokentap_budget_alerts_total{{outcome=\"delivered\",threshold=\"{t}\"}}");
        let start = std::time::Instant::now();
        while tap.metric(&series) != 1.0 {
            assert!(start.elapsed() < PATIENCE, "{series}");
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        assert_eq!(
            tap.metric(&format!(
                "tokentap_budget_alerts_total{{outcome=\"raised\",threshold=\"{t}\"}}"
            )),
            1.0
        );
    }
    // Delivered once each: more calls (refused) raise nothing new.
    calls_until_refused(&[tap.addr], "al");
    assert_eq!(hooks.taken("/hook").len(), 3);
    // The admin page lists them.
    let listed = request(tap.admin, "GET", "/admin/api/alerts", &[], b"").json();
    assert_eq!(listed["webhooks"], 2);
    let alerts = listed["alerts"].as_array().unwrap();
    assert_eq!(thresholds_of(alerts), ["0.5", "0.8", "1"]);
    assert!(alerts.iter().all(|a| a["delivered"] == true), "{listed}");
}

#[test]
fn an_alert_kept_across_a_restart_is_delivered_once() {
    let mock = Mock::start();
    let hooks = Hooks::start(usize::MAX);
    let extra = format!("{TEST_PRICING}\n{CAP}{}", alerts_config(&hooks, "[0.5]"));
    let mut tap = Tap::start(&mock.url(), &extra);
    let body = chat_body(CAP_MODEL, "al", false, r#","max_tokens":20"#);
    for _ in 0..6 {
        assert_eq!(post_chat(tap.addr, &[], &body).status, 200);
    }
    // Raised and tried (the receiver fails everything so far).
    let start = std::time::Instant::now();
    while hooks.attempts.load(std::sync::atomic::Ordering::SeqCst) == 0 {
        assert!(start.elapsed() < PATIENCE, "never tried");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    assert!(tap.proc.terminate().success());
    hooks.fail.store(0, std::sync::atomic::Ordering::SeqCst);
    let dir = tap.into_dir();
    let tap = TapBuilder::new(&mock.url())
        .extra(&extra)
        .in_dir(dir)
        .start();
    let taken = hooks.wait("/hook", 1);
    assert_eq!(thresholds_of(&taken), ["0.5"]);
    hooks.wait("/slack", 1);
    // Nothing raised twice: a later call past the same threshold adds nothing.
    assert_eq!(post_chat(tap.addr, &[], &body).status, 200);
    let series = "tokentap_budget_alerts_total{outcome=\"delivered\",threshold=\"0.5\"}";
    let start = std::time::Instant::now();
    while tap.metric(series) != 1.0 {
        assert!(start.elapsed() < PATIENCE, "{series}");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    assert_eq!(hooks.taken("/hook").len(), 1);
}

#[test]
fn thresholds_change_by_hot_reload() {
    let mock = Mock::start();
    let hooks = Hooks::start(0);
    let tap = Tap::start(
        &mock.url(),
        &format!("{TEST_PRICING}\n{CAP}{}", alerts_config(&hooks, "[0.9]")),
    );
    let old = tap.config_hash();
    tap.write_config(
        &tap.text
            .replace("thresholds = [0.9]", "thresholds = [0.1, 0.9]"),
    );
    tap.wait_config_change(&old);
    let body = chat_body(CAP_MODEL, "al", false, r#","max_tokens":20"#);
    for _ in 0..2 {
        assert_eq!(post_chat(tap.addr, &[], &body).status, 200);
    }
    assert_eq!(thresholds_of(&hooks.wait("/hook", 1)), ["0.1"]);
}

/// 100 % is the cap being reached, not one call too large for it: a call refused at a low
/// spend raises nothing; the 100 % alert comes when spend is past the cap's other thresholds.
#[test]
fn one_oversized_call_refused_at_a_low_spend_is_not_the_cap_reached() {
    let mock = Mock::start();
    let hooks = Hooks::start(0);
    let tap = Tap::start(
        &mock.url(),
        &format!(
            "{TEST_PRICING}\n{CAP}{}",
            alerts_config(&hooks, "[0.8, 1.0]")
        ),
    );
    let big = chat_body(CAP_MODEL, "al", false, r#","max_tokens":150"#);
    assert_eq!(post_chat(tap.addr, &[], &big).status, 200);
    let huge = chat_body(CAP_MODEL, "al", false, r#","max_tokens":500"#);
    assert_eq!(post_chat(tap.addr, &[], &huge).status, 429);
    calls_until_refused(&[tap.addr], "al");
    let taken = hooks.wait("/hook", 2);
    assert_eq!(thresholds_of(&taken), ["0.8", "1"]);
    let full = taken.iter().find(|a| a["threshold"] == "1").unwrap();
    assert!(full["spent_tokens"].as_u64().unwrap() >= 160, "{full}");
}
