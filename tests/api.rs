#![allow(clippy::unwrap_used)]
//! The REST API against the seed (routes) and the reference (VMs): every field,
//! default, validation rule and error string. Uses the fake hypervisor.

mod common;

use common::FakeDaemon;
use serde_json::{json, Value};

const INVALID: &str =
    "subdomain must be lowercase alphanumeric with optional hyphens (max 63 chars)";

fn err(v: &Value) -> &str {
    v["error"].as_str().unwrap_or("<no error field>")
}

#[tokio::test]
async fn route_create_has_the_seed_fields_and_defaults() {
    let d = FakeDaemon::start(&[]).await;
    let vm = d.create_vm().await;
    let (s, r) = d
        .call(
            "POST",
            &format!("/vms/{vm}/routes"),
            Some(json!({"subdomain": "myapp", "target_port": 8080})),
        )
        .await;
    assert_eq!(s, 201, "{r}");
    let mut keys: Vec<&str> = r.as_object().unwrap().keys().map(|k| k.as_str()).collect();
    keys.sort();
    assert_eq!(
        keys,
        [
            "auto_wake",
            "created_at",
            "id",
            "subdomain",
            "target_port",
            "updated_at",
            "vm_id"
        ]
    );
    assert_eq!(r["auto_wake"], true, "auto_wake defaults to true");
    assert_eq!(r["vm_id"], vm.as_str());
    assert_eq!(r["target_port"], 8080);
    let id = r["id"].as_str().unwrap();
    assert!(id.starts_with("rt_") && id.len() == 15, "{id}");
    let created = r["created_at"].as_str().unwrap();
    assert!(chrono::DateTime::parse_from_rfc3339(created).is_ok() && created.ends_with('Z'));

    // No subdomain: a random 12-character one that obeys the rule.
    let (s, r) = d
        .call(
            "POST",
            &format!("/vms/{vm}/routes"),
            Some(json!({"target_port": 3000, "auto_wake": false})),
        )
        .await;
    assert_eq!(s, 201, "{r}");
    let sub = r["subdomain"].as_str().unwrap();
    assert_eq!(sub.len(), 12);
    assert!(hatch::model::validate_subdomain(sub).is_ok(), "{sub}");
    assert_eq!(r["auto_wake"], false);
    // An empty subdomain means "pick one" as well.
    let (s, r) = d
        .call(
            "POST",
            &format!("/vms/{vm}/routes"),
            Some(json!({"subdomain": "", "target_port": 1})),
        )
        .await;
    assert_eq!(s, 201, "{r}");
    assert_eq!(r["subdomain"].as_str().unwrap().len(), 12);
}

#[tokio::test]
async fn target_port_must_be_in_range() {
    let d = FakeDaemon::start(&[]).await;
    let vm = d.create_vm().await;
    for body in [
        json!({"subdomain": "p1"}),
        json!({"subdomain": "p1", "target_port": 0}),
        json!({"subdomain": "p1", "target_port": 65536}),
        json!({"subdomain": "p1", "target_port": -5}),
    ] {
        let (s, v) = d
            .call("POST", &format!("/vms/{vm}/routes"), Some(body.clone()))
            .await;
        assert_eq!(s, 400, "{body}");
        assert_eq!(err(&v), "target_port must be between 1 and 65535");
    }
    for port in [1, 65535] {
        let (s, v) = d
            .call(
                "POST",
                &format!("/vms/{vm}/routes"),
                Some(json!({"target_port": port})),
            )
            .await;
        assert_eq!(s, 201, "{v}");
    }
    let (s, v) = d
        .call(
            "POST",
            &format!("/vms/{vm}/routes"),
            Some(json!({"target_port": "8080"})),
        )
        .await;
    assert_eq!(s, 400);
    assert!(err(&v).contains("invalid JSON body"), "{v}");
}

#[tokio::test]
async fn subdomain_rule_reserved_list_and_exact_messages() {
    let d = FakeDaemon::start(&[]).await;
    let vm = d.create_vm().await;
    let long_ok = "a".repeat(63);
    let long_bad = "a".repeat(64);
    for bad in [
        "MyApp",
        "-app",
        "app-",
        "my_app",
        "my.app",
        "my app",
        long_bad.as_str(),
        "ünï",
    ] {
        let (s, v) = d
            .call(
                "POST",
                &format!("/vms/{vm}/routes"),
                Some(json!({"subdomain": bad, "target_port": 8080})),
            )
            .await;
        assert_eq!(s, 400, "{bad}");
        assert_eq!(err(&v), INVALID, "{bad}");
    }
    let (s, v) = d
        .call(
            "POST",
            &format!("/vms/{vm}/routes"),
            Some(json!({"subdomain": long_ok, "target_port": 8080})),
        )
        .await;
    assert_eq!(s, 201, "{v}");
    for r in hatch::model::RESERVED_SUBDOMAINS {
        let (s, v) = d
            .call(
                "POST",
                &format!("/vms/{vm}/routes"),
                Some(json!({"subdomain": r, "target_port": 8080})),
            )
            .await;
        assert_eq!(s, 400, "{r}");
        assert_eq!(err(&v), format!("subdomain \"{r}\" is reserved"));
    }
    // The exact body of the seed's example.
    let resp = d
        .http
        .post(format!("{}/vms/{vm}/routes", d.api))
        .bearer_auth(&d.key)
        .json(&json!({"subdomain": "api", "target_port": 8080}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.headers()["content-type"], "application/json");
    assert_eq!(
        resp.text().await.unwrap(),
        r#"{"error":"subdomain \"api\" is reserved"}"#
    );
}

#[tokio::test]
async fn duplicate_subdomain_is_409_even_when_racing() {
    let d = FakeDaemon::start(&[]).await;
    let vm = d.create_vm().await;
    d.route(&vm, "myapp", true).await;
    let (s, v) = d
        .call(
            "POST",
            &format!("/vms/{vm}/routes"),
            Some(json!({"subdomain": "myapp", "target_port": 9000})),
        )
        .await;
    assert_eq!(s, 409);
    assert_eq!(err(&v), "subdomain \"myapp\" is already in use");

    let vm2 = d.create_vm().await;
    let mut tasks = Vec::new();
    for i in 0..16 {
        let http = d.http.clone();
        let url = format!(
            "{}/vms/{}/routes",
            d.api,
            if i % 2 == 0 { &vm } else { &vm2 }
        );
        let key = d.key.clone();
        tasks.push(tokio::spawn(async move {
            let r = http
                .post(url)
                .bearer_auth(key)
                .json(&json!({"subdomain": "race", "target_port": 8080}))
                .send()
                .await
                .unwrap();
            let s = r.status().as_u16();
            (s, r.json::<Value>().await.unwrap())
        }));
    }
    let mut created = 0;
    for t in tasks {
        let (s, v) = t.await.unwrap();
        match s {
            201 => created += 1,
            409 => assert_eq!(err(&v), "subdomain \"race\" is already in use"),
            other => panic!("unexpected {other}: {v}"),
        }
    }
    assert_eq!(created, 1);
}

#[tokio::test]
async fn list_is_newest_first_and_delete_says_deleted() {
    let d = FakeDaemon::start(&[]).await;
    let vm = d.create_vm().await;
    let (s, v) = d.call("GET", &format!("/vms/{vm}/routes"), None).await;
    assert_eq!(
        (s, v.clone()),
        (200, json!([])),
        "empty list is [] not null"
    );
    let a = d.route(&vm, "first", true).await;
    let b = d.route(&vm, "second", false).await;
    let c = d.route(&vm, "third", true).await;
    let (_, list) = d.call("GET", &format!("/vms/{vm}/routes"), None).await;
    let ids: Vec<&str> = list
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["id"].as_str().unwrap())
        .collect();
    assert_eq!(
        ids,
        [
            c["id"].as_str().unwrap(),
            b["id"].as_str().unwrap(),
            a["id"].as_str().unwrap()
        ]
    );

    let (s, v) = d
        .call(
            "DELETE",
            &format!("/routes/{}", b["id"].as_str().unwrap()),
            None,
        )
        .await;
    assert_eq!((s, v), (200, json!({"status": "deleted"})));
    let (s, v) = d
        .call(
            "DELETE",
            &format!("/routes/{}", b["id"].as_str().unwrap()),
            None,
        )
        .await;
    assert_eq!(s, 404);
    assert_eq!(err(&v), "not found");
    // The subdomain is free again and no longer routed.
    let (st, _) = d.get("second.hatch.local").await;
    assert_eq!(st, 404);
    d.route(&vm, "second", true).await;
}

#[tokio::test]
async fn routes_of_unknown_or_foreign_vms_are_404() {
    let d = FakeDaemon::start(&[]).await;
    let vm = d.create_vm().await;
    let r = d.route(&vm, "mine", true).await;
    let (s, _) = d
        .call(
            "POST",
            "/vms/vm_doesnotexist/routes",
            Some(json!({"target_port": 80})),
        )
        .await;
    assert_eq!(s, 404);
    let (s, _) = d.call("GET", "/vms/vm_doesnotexist/routes", None).await;
    assert_eq!(s, 404);

    // Another user's key sees none of it.
    let mgr = &d.running.as_ref().unwrap().manager;
    mgr.add_key("bob", &hatch::api::hash_key("bobs-key"))
        .await
        .unwrap();
    let bob = |m: reqwest::Method, p: String| {
        d.http
            .request(m, format!("{}{}", d.api, p))
            .bearer_auth("bobs-key")
    };
    let resp = bob(
        reqwest::Method::DELETE,
        format!("/routes/{}", r["id"].as_str().unwrap()),
    )
    .send()
    .await
    .unwrap();
    assert_eq!(resp.status(), 404, "someone else's route is 404");
    let resp = bob(reqwest::Method::GET, format!("/vms/{vm}"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 404);
    let resp = bob(reqwest::Method::GET, "/vms".into())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.json::<Value>().await.unwrap(), json!([]));
    let (s, _) = d.call("GET", &format!("/vms/{vm}/routes"), None).await;
    assert_eq!(s, 200, "the route survived bob's attempt");
}

#[tokio::test]
async fn auth_is_required_with_clear_errors() {
    let d = FakeDaemon::start(&[]).await;
    let url = format!("{}/vms", d.api);
    let cases: Vec<(Option<(&str, &str)>, &str)> = vec![
        (None, "missing api key"),
        (
            Some(("authorization", "Basic abc")),
            "invalid authorization header",
        ),
        (
            Some(("authorization", "Bearer ")),
            "invalid authorization header",
        ),
        (Some(("authorization", "Bearer wrong")), "invalid api key"),
        (Some(("x-api-key", "wrong")), "invalid api key"),
    ];
    for (h, want) in cases {
        let mut req = d.http.get(&url);
        if let Some((k, v)) = h {
            req = req.header(k, v);
        }
        let resp = req.send().await.unwrap();
        assert_eq!(resp.status(), 401, "{h:?}");
        assert_eq!(err(&resp.json::<Value>().await.unwrap()), want);
    }
    let resp = d
        .http
        .get(&url)
        .header("x-api-key", &d.key)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    // The key file is private and the key is stored hashed.
    use std::os::unix::fs::PermissionsExt;
    let meta = std::fs::metadata(d.dir.path().join("data/admin.key")).unwrap();
    assert_eq!(meta.permissions().mode() & 0o777, 0o600);
    let db = std::fs::read(d.dir.path().join("data/hatch.db")).unwrap();
    assert!(!String::from_utf8_lossy(&db).contains(&d.key));
    // Health needs no key.
    let resp = d
        .http
        .get(format!("{}/healthz", d.api))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
}

#[tokio::test]
async fn vm_api_shapes_states_and_conflicts() {
    let d = FakeDaemon::start(&[]).await;
    let (s, v) = d.call("GET", "/vms", None).await;
    assert_eq!((s, v), (200, json!([])));
    let (s, v) = d.call("POST", "/vms", Some(json!({"bogus": 1}))).await;
    assert_eq!(s, 400);
    assert!(err(&v).contains("unknown field"), "{v}");
    let (s, v) = d
        .call("POST", "/vms", Some(json!({"image_id": "img_nope"})))
        .await;
    assert_eq!(s, 400);
    assert_eq!(err(&v), "image not found: img_nope");

    let (s, vm) = d
        .call(
            "POST",
            "/vms",
            Some(json!({"vcpu_count": 99, "mem_mib": 1})),
        )
        .await;
    assert_eq!(s, 201, "{vm}");
    let id = vm["id"].as_str().unwrap().to_string();
    assert!(id.starts_with("vm_") && id.len() == 15);
    assert_eq!(vm["vcpu_count"], 32);
    assert_eq!(vm["mem_mib"], 128);
    assert_eq!(vm["image_id"], "img_default");
    d.wait_state(&id, "running").await;
    let (s, v) = d.call("GET", &format!("/vms/{id}/snapshots"), None).await;
    assert_eq!((s, v), (200, json!([])));

    let (s, v) = d.call("POST", &format!("/vms/{id}/start"), None).await;
    assert_eq!(s, 409);
    assert!(err(&v).contains("running"), "{v}");
    let (s, v) = d.call("POST", &format!("/vms/{id}/restore"), None).await;
    assert_eq!(s, 409);
    assert!(err(&v).contains("running"), "{v}");

    let (s, snap) = d.call("POST", &format!("/vms/{id}/snapshot"), None).await;
    assert_eq!(s, 201, "{snap}");
    assert!(snap["id"].as_str().unwrap().starts_with("snap_"));
    d.wait_state(&id, "snapshotted").await;
    let (s, v) = d.call("POST", &format!("/vms/{id}/snapshot"), None).await;
    assert_eq!(s, 409);
    assert!(err(&v).contains("snapshotted"), "{v}");
    let (s, v) = d.call("POST", &format!("/vms/{id}/stop"), None).await;
    assert_eq!(s, 409);
    assert!(err(&v).contains("snapshotted"), "{v}");

    let (s, v) = d.call("POST", &format!("/vms/{id}/restore"), None).await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["state"], "running");
    assert_eq!(v["restore_count"], 1);
    let (s, v) = d.call("POST", &format!("/vms/{id}/stop"), None).await;
    assert_eq!((s, v["state"].clone()), (200, json!("stopped")));
    let (s, v) = d.call("POST", &format!("/vms/{id}/stop"), None).await;
    assert_eq!(s, 409);
    assert!(err(&v).contains("stopped"), "{v}");
    let (s, v) = d.call("POST", &format!("/vms/{id}/start"), None).await;
    assert_eq!((s, v["state"].clone()), (200, json!("running")));
    assert_eq!(v["boot_count"], 2);

    let (s, list) = d.call("GET", &format!("/vms/{id}/snapshots"), None).await;
    assert_eq!(s, 200);
    assert_eq!(list.as_array().unwrap().len(), 1);

    let (s, v) = d.call("DELETE", &format!("/vms/{id}"), None).await;
    assert_eq!((s, v), (200, json!({"status": "deleted"})));
    let (s, _) = d.call("GET", &format!("/vms/{id}"), None).await;
    assert_eq!(s, 404);
    assert_eq!(d.fake.live.load(std::sync::atomic::Ordering::SeqCst), 0);
}

#[tokio::test]
async fn quota_is_403_and_unknown_paths_are_json() {
    let d = FakeDaemon::start(&[("HATCH_MAX_VMS_PER_USER", "2")]).await;
    d.create_vm().await;
    d.create_vm().await;
    let (s, v) = d.call("POST", "/vms", None).await;
    assert_eq!(s, 403);
    assert_eq!(err(&v), "vm limit reached (2/2)");
    let (s, v) = d.call("GET", "/nope", None).await;
    assert_eq!(s, 404);
    assert_eq!(err(&v), "not found");
    let (s, v) = d.call("PUT", "/vms", None).await;
    assert_eq!(s, 405);
    assert_eq!(err(&v), "method not allowed");
    let (s, v) = d.call("POST", "/vms", Some(json!([1, 2]))).await;
    assert_eq!(s, 400, "{v}");
}
