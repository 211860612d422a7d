#![allow(clippy::unwrap_used)]
//! End to end with real QEMU guests (TCG here, KVM where usable): the hatchd
//! binary, the default image, the API, the proxy and wakes. One guest-heavy test
//! at a time (two cores).

mod common;

use std::time::{Duration, Instant};

use common::proxy_get;
use common::real::{children_of, listening_ports, open_fds, Hatchd, QEMU_LOCK};
use serde_json::json;

const BOOT: Duration = Duration::from_secs(90);

async fn vm_with_route(h: &Hatchd, sub: &str, auto_wake: bool, body: serde_json::Value) -> String {
    let (s, vm) = h.call("POST", "/vms", Some(body)).await;
    assert_eq!(s, 201, "{vm}");
    let id = vm["id"].as_str().unwrap().to_string();
    let (s, r) = h
        .call(
            "POST",
            &format!("/vms/{id}/routes"),
            Some(json!({"subdomain": sub, "target_port": 8080, "auto_wake": auto_wake})),
        )
        .await;
    assert_eq!(s, 201, "{r}");
    h.wait_state(&id, "running", BOOT).await;
    id
}

fn page(vm: &str) -> String {
    format!("hatch guest {vm}\n")
}

async fn get_page(h: &Hatchd, host: &str, vm: &str) {
    let (s, body) = proxy_get(h.proxy, host).await;
    assert_eq!(
        (s, body.as_str()),
        (200, page(vm).as_str()),
        "log:\n{}",
        h.log()
    );
}

#[tokio::test]
async fn route_snapshot_stop_and_wake_with_a_real_guest() {
    let _g = QEMU_LOCK.lock().await;
    let h = Hatchd::start(&[]).await;
    let vm = vm_with_route(&h, "myapp", true, json!({})).await;

    // Running: the guest's page through the proxy (H1: any case, any port).
    get_page(&h, "myapp.hatch.local:9090", &vm).await;
    get_page(&h, "MyApp.Hatch.Local:80", &vm).await;

    // Snapshot → snapshotted → a request restores it (W1).
    let (s, snap) = h.call("POST", &format!("/vms/{vm}/snapshot"), None).await;
    assert_eq!(s, 201, "{snap}");
    assert!(snap["size_bytes"].as_i64().unwrap() > 0);
    assert_eq!(h.vm(&vm).await["state"], "snapshotted");
    get_page(&h, "myapp.hatch.local", &vm).await;
    let v = h.vm(&vm).await;
    assert_eq!(v["state"], "running");
    assert_eq!(v["restore_count"], 1);

    // Stop → stopped → a request boots it.
    let (s, v) = h.call("POST", &format!("/vms/{vm}/stop"), None).await;
    assert_eq!((s, v["state"].clone()), (200, json!("stopped")), "{v}");
    get_page(&h, "myapp.hatch.local", &vm).await;
    let v = h.vm(&vm).await;
    assert_eq!(v["state"], "running");
    assert_eq!(v["boot_count"], 2);

    // API start: "running" means the guest is up (its ready line is in this
    // boot's serial log), not that QEMU was spawned.
    h.call("POST", &format!("/vms/{vm}/stop"), None).await;
    let (s, v) = h.call("POST", &format!("/vms/{vm}/start"), None).await;
    assert_eq!((s, v["state"].clone()), (200, json!("running")), "{v}");
    assert_eq!(
        h.serial_log(&vm).matches("HATCH_GUEST_READY").count(),
        1,
        "{}",
        h.serial_log(&vm)
    );
    get_page(&h, "myapp.hatch.local", &vm).await;

    // API restore.
    h.call("POST", &format!("/vms/{vm}/snapshot"), None).await;
    let (s, v) = h.call("POST", &format!("/vms/{vm}/restore"), None).await;
    assert_eq!((s, v["state"].clone()), (200, json!("running")), "{v}");
    get_page(&h, "myapp.hatch.local", &vm).await;

    let (s, _) = h.call("DELETE", &format!("/vms/{vm}"), None).await;
    assert_eq!(s, 200);
    assert!(children_of(h.pid()).is_empty(), "no qemu left after delete");
    let (s, _) = proxy_get(h.proxy, "myapp.hatch.local").await;
    assert_eq!(s, 404);
}

#[tokio::test]
async fn concurrent_requests_to_a_snapshotted_vm_share_one_restore() {
    let _g = QEMU_LOCK.lock().await;
    let h = Hatchd::start(&[]).await;
    let vm = vm_with_route(&h, "busy", true, json!({})).await;
    for (round, n) in [(1, 20), (2, 50)] {
        let (s, _) = h.call("POST", &format!("/vms/{vm}/snapshot"), None).await;
        assert_eq!(s, 201);
        let tasks: Vec<_> = (0..n)
            .map(|_| tokio::spawn(proxy_get(h.proxy, "busy.hatch.local")))
            .collect();
        for t in tasks {
            let (s, body) = t.await.unwrap();
            assert_eq!((s, body), (200, page(&vm)), "log:\n{}", h.log());
        }
        let v = h.vm(&vm).await;
        assert_eq!(
            v["restore_count"], round,
            "exactly one restore for {n} requests"
        );
        assert_eq!(v["state"], "running");
    }
    let woken = h
        .log()
        .lines()
        .filter(|l| l.contains("vm woken") && l.contains("kind=\"restore\""))
        .count();
    assert_eq!(woken, 2, "the log shows one restore per round");
}

#[tokio::test]
async fn auto_wake_false_keeps_a_snapshotted_vm_asleep() {
    let _g = QEMU_LOCK.lock().await;
    let h = Hatchd::start(&[]).await;
    let vm = vm_with_route(&h, "sleepy", false, json!({})).await;
    get_page(&h, "sleepy.hatch.local", &vm).await;
    h.call("POST", &format!("/vms/{vm}/snapshot"), None).await;
    let (s, body) = proxy_get(h.proxy, "sleepy.hatch.local").await;
    assert_eq!(s, 503, "{body}");
    assert!(serde_json::from_str::<serde_json::Value>(&body).unwrap()["error"].is_string());
    tokio::time::sleep(Duration::from_millis(500)).await;
    let v = h.vm(&vm).await;
    assert_eq!(v["state"], "snapshotted");
    assert_eq!(v["restore_count"], 0);
    assert!(
        children_of(h.pid()).is_empty(),
        "no guest process was started"
    );
}

#[tokio::test]
async fn w3_a_service_that_listens_late_is_waited_for() {
    let _g = QEMU_LOCK.lock().await;
    let h = Hatchd::start(&[]).await;
    let script = "#!/bin/sh\nsleep 3\nmkdir -p /srv\necho late-service > /srv/index.html\nexec httpd -f -p 8080 -h /srv\n";
    let (s, vm) = h
        .call("POST", "/vms", Some(json!({"user_data": script})))
        .await;
    assert_eq!(s, 201, "{vm}");
    let id = vm["id"].as_str().unwrap().to_string();
    h.call(
        "POST",
        &format!("/vms/{id}/routes"),
        Some(json!({"subdomain": "late", "target_port": 8080})),
    )
    .await;
    // Sent while the VM is still booting: waits for the boot and for the port.
    let (s, body) = proxy_get(h.proxy, "late.hatch.local").await;
    assert_eq!(
        (s, body.as_str()),
        (200, "late-service\n"),
        "log:\n{}\nserial:\n{}",
        h.log(),
        h.serial_log(&id)
    );
    // And after a cold boot from stopped.
    h.call("POST", &format!("/vms/{id}/stop"), None).await;
    let (s, body) = proxy_get(h.proxy, "late.hatch.local").await;
    assert_eq!((s, body.as_str()), (200, "late-service\n"));
}

#[tokio::test]
async fn w5_a_lost_snapshot_gives_503_and_a_truthful_state() {
    let _g = QEMU_LOCK.lock().await;
    let h = Hatchd::start(&[]).await;
    let vm = vm_with_route(&h, "lost", true, json!({})).await;
    let (_, snap) = h.call("POST", &format!("/vms/{vm}/snapshot"), None).await;
    common::lose_snapshot(&h.data_dir(), &snap);
    let (s, body) = proxy_get(h.proxy, "lost.hatch.local").await;
    assert!(s == 502 || s == 503, "{s} {body}");
    let v = h.vm(&vm).await;
    assert_eq!(v["state"], "error", "{v}");
    assert!(h.log().contains("wake failed"), "the reason is in the log");
    assert!(children_of(h.pid()).is_empty());
}

#[tokio::test]
async fn w6_twenty_cycles_leak_nothing_and_do_not_slow_down() {
    let _g = QEMU_LOCK.lock().await;
    let h = Hatchd::start(&[]).await;
    let vm = vm_with_route(&h, "cycle", true, json!({})).await;
    get_page(&h, "cycle.hatch.local", &vm).await;
    // Two warm-up cycles first: the store's connection pool and the proxy
    // workers' guest pools reach their working size (a leak grows with cycles).
    for _ in 0..2 {
        let (s, v) = h.call("POST", &format!("/vms/{vm}/snapshot"), None).await;
        assert_eq!(s, 201, "{v}");
        get_page(&h, "cycle.hatch.local", &vm).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let fds_before = open_fds(h.pid());
    let kids_before = children_of(h.pid()).len();
    let ports_before: usize = children_of(h.pid())
        .iter()
        .map(|p| listening_ports(*p))
        .sum();
    assert_eq!(kids_before, 1);
    assert_eq!(ports_before, 1, "one forwarded port for the one route");
    let mut wakes = Vec::new();
    for _ in 0..20 {
        let (s, v) = h.call("POST", &format!("/vms/{vm}/snapshot"), None).await;
        assert_eq!(s, 201, "{v}");
        let t0 = Instant::now();
        get_page(&h, "cycle.hatch.local", &vm).await;
        wakes.push(t0.elapsed());
    }
    // Let pooled upstream connections to dead guests be noticed.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let kids = children_of(h.pid());
    let ports: usize = kids.iter().map(|p| listening_ports(*p)).sum();
    assert_eq!(kids.len(), kids_before, "child processes");
    assert_eq!(ports, ports_before, "forwarded ports");
    let fds_after = open_fds(h.pid());
    assert!(
        fds_after <= fds_before + 2,
        "fds {fds_before} → {fds_after}"
    );
    let first = wakes[0];
    let last = wakes[19];
    eprintln!("wake latencies: {wakes:?}");
    assert!(
        last < first * 3 + Duration::from_secs(1),
        "first {first:?}, last {last:?}"
    );
    assert_eq!(
        h.vm(&vm).await["restore_count"],
        2 + 20,
        "warm-up and cycles"
    );
    let (_, snaps) = h.call("GET", &format!("/vms/{vm}/snapshots"), None).await;
    assert_eq!(
        snaps.as_array().unwrap().len(),
        10,
        "old snapshots pruned to HATCH_MAX_SNAPSHOTS_PER_VM"
    );
}

#[tokio::test]
async fn restarts_keep_every_vm_and_route_reachable() {
    let _g = QEMU_LOCK.lock().await;
    let mut h = Hatchd::start(&[]).await;
    let a = vm_with_route(&h, "alpha", true, json!({})).await;
    let b = vm_with_route(&h, "beta", true, json!({})).await;
    h.call("POST", &format!("/vms/{b}/snapshot"), None).await;

    // Graceful restart: running VMs are snapshotted on the way down.
    h.restart(false).await;
    assert_eq!(h.vm(&a).await["state"], "snapshotted");
    get_page(&h, "alpha.hatch.local", &a).await;
    get_page(&h, "beta.hatch.local", &b).await;

    // Hard kill: the guests outlive hatchd and are taken over, memory and all.
    let before = h.vm(&a).await;
    h.restart(true).await;
    let v = h.vm(&a).await;
    assert_eq!(v["state"], "running", "{v}");
    assert_eq!(v["boot_count"], before["boot_count"], "no cold boot");
    assert_eq!(v["restore_count"], before["restore_count"], "no restore");
    get_page(&h, "alpha.hatch.local", &a).await;
    get_page(&h, "beta.hatch.local", &b).await;
    let (_, events) = h.call("GET", &format!("/vms/{a}/events"), None).await;
    assert_eq!(common::lifecycle(&events)[0]["kind"], "adopt", "{events}");

    // Hard kill with the guests gone too: marked stopped, the next request boots.
    h.stop(true);
    common::real::kill_guests(&h.data_dir());
    h.restart(false).await;
    let v = h.vm(&a).await;
    assert_eq!(v["state"], "stopped", "{v}");
    get_page(&h, "alpha.hatch.local", &a).await;
    get_page(&h, "beta.hatch.local", &b).await;
    let (_, routes) = h.call("GET", &format!("/vms/{b}/routes"), None).await;
    assert_eq!(routes[0]["subdomain"], "beta");
}

#[tokio::test]
async fn a_guest_process_that_dies_is_noticed_and_woken_again() {
    let _g = QEMU_LOCK.lock().await;
    let h = Hatchd::start(&[]).await;
    let vm = vm_with_route(&h, "fragile", true, json!({})).await;
    get_page(&h, "fragile.hatch.local", &vm).await;
    let kids = children_of(h.pid());
    assert_eq!(kids.len(), 1);
    // We started this QEMU (through hatchd): end it behind hatchd's back.
    std::process::Command::new("kill")
        .arg("-KILL")
        .arg(kids[0].to_string())
        .status()
        .unwrap();
    let v = h.wait_state(&vm, "stopped", Duration::from_secs(10)).await;
    assert!(
        v["last_error"]
            .as_str()
            .unwrap()
            .contains("exited unexpectedly"),
        "{v}"
    );
    assert!(h.log().contains("exited unexpectedly"));
    get_page(&h, "fragile.hatch.local", &vm).await;
    assert_eq!(h.vm(&vm).await["state"], "running");
}

#[tokio::test]
async fn a_route_added_to_a_running_vm_is_forwarded_at_once() {
    let _g = QEMU_LOCK.lock().await;
    let h = Hatchd::start(&[]).await;
    let script = "#!/bin/sh\nmkdir -p /a /b\necho port-a > /a/index.html\necho port-b > /b/index.html\nhttpd -p 8080 -h /a\nexec httpd -f -p 3000 -h /b\n";
    let (_, vm) = h
        .call("POST", "/vms", Some(json!({"user_data": script})))
        .await;
    let id = vm["id"].as_str().unwrap().to_string();
    h.call(
        "POST",
        &format!("/vms/{id}/routes"),
        Some(json!({"subdomain": "porta", "target_port": 8080})),
    )
    .await;
    h.wait_state(&id, "running", BOOT).await;
    let (s, body) = proxy_get(h.proxy, "porta.hatch.local").await;
    assert_eq!((s, body.as_str()), (200, "port-a\n"));
    let before = children_of(h.pid())
        .iter()
        .map(|p| listening_ports(*p))
        .sum::<usize>();
    let (s, _) = h
        .call(
            "POST",
            &format!("/vms/{id}/routes"),
            Some(json!({"subdomain": "portb", "target_port": 3000})),
        )
        .await;
    assert_eq!(s, 201);
    let after = children_of(h.pid())
        .iter()
        .map(|p| listening_ports(*p))
        .sum::<usize>();
    assert_eq!(
        after,
        before + 1,
        "the new port is forwarded when the route is created"
    );
    let (s, body) = proxy_get(h.proxy, "portb.hatch.local").await;
    assert_eq!((s, body.as_str()), (200, "port-b\n"));
    // Both ports survive a snapshot and restore.
    h.call("POST", &format!("/vms/{id}/snapshot"), None).await;
    let (s, body) = proxy_get(h.proxy, "portb.hatch.local").await;
    assert_eq!((s, body.as_str()), (200, "port-b\n"));
    let (s, body) = proxy_get(h.proxy, "porta.hatch.local").await;
    assert_eq!((s, body.as_str()), (200, "port-a\n"));
}

#[tokio::test]
async fn idle_real_guests_sleep_and_the_next_request_wakes_them() {
    let _g = QEMU_LOCK.lock().await;
    let h = Hatchd::start(&[
        ("HATCH_IDLE_TIMEOUT", "3s"),
        ("HATCH_IDLE_CHECK_INTERVAL", "200ms"),
    ])
    .await;
    let vm = vm_with_route(&h, "dozy", true, json!({})).await;
    get_page(&h, "dozy.hatch.local", &vm).await;
    // A VM without routes is covered too.
    let (_, bare) = h.call("POST", "/vms", Some(json!({}))).await;
    let bare = bare["id"].as_str().unwrap().to_string();
    h.wait_state(&bare, "running", BOOT).await;
    h.wait_state(&vm, "snapshotted", Duration::from_secs(30))
        .await;
    h.wait_state(&bare, "snapshotted", Duration::from_secs(30))
        .await;
    assert!(
        children_of(h.pid()).is_empty(),
        "sleeping guests use no process"
    );
    get_page(&h, "dozy.hatch.local", &vm).await;
    let v = h.vm(&vm).await;
    assert_eq!(
        (v["state"].clone(), v["restore_count"].clone()),
        (json!("running"), json!(1))
    );
    let path = format!("/vms/{vm}/events");
    let events = common::events_with(|| h.call("GET", &path, None), "first_byte").await;
    assert_eq!(events[0]["kind"], "first_byte", "{events}");
    assert_eq!(events[0]["detail"]["attempts"], 1, "{events}");
    let life = common::lifecycle(&events);
    assert_eq!(life[0]["kind"], "restore", "{events}");
    assert_eq!(life[1]["kind"], "snapshot");
    assert_eq!(life[1]["detail"]["trigger"], "idle");
    assert!(h.log().contains("vm idle; putting it to sleep"));
}

#[tokio::test]
async fn sigkill_in_the_middle_of_a_snapshot_leaves_a_usable_vm() {
    let _g = QEMU_LOCK.lock().await;
    let mut h = Hatchd::start(&[]).await;
    let vm = vm_with_route(&h, "hardy", true, json!({})).await;
    get_page(&h, "hardy.hatch.local", &vm).await;
    // Kill hatchd at different points of a snapshot: while QEMU writes it,
    // between the file and its record, and after.
    for delay_ms in [30u64, 150, 400, 800, 1500] {
        let snap = {
            let http = h.http.clone();
            let url = format!("{}/vms/{vm}/snapshot", h.api);
            let key = h.key.clone();
            tokio::spawn(async move {
                let _ = http.post(url).bearer_auth(key).send().await;
            })
        };
        tokio::time::sleep(Duration::from_millis(delay_ms)).await;
        h.restart(true).await;
        let _ = snap.await;
        let v = h.vm(&vm).await;
        let state = v["state"].as_str().unwrap().to_string();
        assert!(
            state == "running" || state == "snapshotted",
            "killed after {delay_ms} ms: state {state}, log:\n{}",
            h.log()
        );
        // Either way the route answers, and the VM is running afterwards.
        get_page(&h, "hardy.hatch.local", &vm).await;
        assert_eq!(h.vm(&vm).await["state"], "running");
        assert_eq!(
            children_of(h.pid()).len() + adopted_guests(&h),
            1,
            "exactly one guest process"
        );
        eprintln!("killed after {delay_ms} ms → {state}");
    }
}

/// Guests of this data dir that are not hatchd's children (taken over after a
/// restart: their parent is gone).
fn adopted_guests(h: &Hatchd) -> usize {
    let mut n = 0;
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let cmd = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        let cmd = String::from_utf8_lossy(&cmd);
        if cmd.contains("qemu-system")
            && cmd.contains(&*h.data_dir().to_string_lossy())
            && !children_of(h.pid()).contains(&pid)
        {
            n += 1;
        }
    }
    n
}
