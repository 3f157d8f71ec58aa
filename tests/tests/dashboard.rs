//! The admin listener's live dashboard, in a real browser: headless
//! Chromium (Debian `chromium`, installed by `cargo xtask setup`) loads
//! `/dashboard`, which must render the gateway's own figures with no console
//! error, and show them move under load.

use std::process::Command;

use gateway_tests::gateway::temp_dir;
use gateway_tests::{one_cluster, Backend, Client, Driver, Gateway, Spec};

/// The page after the browser ran it for a few (virtual) seconds, and
/// the browser's log.
fn load(url: &str) -> (String, String) {
    let profile = temp_dir("chromium");
    let out = Command::new("chromium")
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--no-first-run",
            "--enable-logging=stderr",
            "--v=0",
            "--virtual-time-budget=2500",
        ])
        .arg(format!("--user-data-dir={}", profile.display()))
        .args(["--dump-dom", url])
        .output()
        .expect("chromium runs (cargo xtask setup installs it)");
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The text of the element with this id.
fn field(dom: &str, id: &str) -> String {
    let at = dom
        .find(&format!("id=\"{id}\""))
        .unwrap_or_else(|| panic!("no #{id} in {dom:.2000}"));
    let rest = &dom[at..];
    let start = rest.find('>').unwrap() + 1;
    rest[start..start + rest[start..].find('<').unwrap()].to_string()
}

#[test]
fn dashboard_renders_live_figures_in_a_browser() {
    let b = Backend::start("dash");
    let g = Gateway::start(Spec::new(Driver::Auto, &one_cluster(b.addr)));
    let url = format!("http://{}/dashboard", g.admin);
    let mut c = Client::connect(g.addr);
    for _ in 0..5 {
        assert_eq!(c.get("/x").status, 200);
    }
    g.wait_metric(&["gateway_requests_total"], 5.0);
    let (dom, log) = load(&url);
    for bad in ["Uncaught", "CONSOLE(", "Refused to"] {
        assert!(
            !log.lines()
                .any(|l| l.contains(bad) && !l.contains("DevTools")),
            "browser reported `{bad}`:\n{log}"
        );
    }
    assert!(
        dom.contains("data-updates="),
        "the page never updated: {dom:.3000}"
    );
    assert!(
        field(&dom, "status").starts_with("updated"),
        "{}",
        field(&dom, "status")
    );
    let before: f64 = field(&dom, "total").parse().expect("a number of requests");
    assert!(before >= 5.0, "requests served shown: {before}");
    assert_eq!(field(&dom, "workers"), "2");
    assert!(dom.contains(&b.addr.to_string()), "the backend's row");

    // Under load the figures move.
    for _ in 0..30 {
        assert_eq!(c.get("/y").status, 200);
    }
    g.wait_metric(&["gateway_requests_total"], before + 30.0);
    let (dom, _) = load(&url);
    let after: f64 = field(&dom, "total").parse().unwrap();
    assert!(
        after >= before + 30.0,
        "figures did not move: {before} → {after}"
    );
}
