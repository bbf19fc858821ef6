//! The compose file's `monitoring` profile, checked without running it: no Grafana
//! image can be pulled where these tests run, so the Grafana service, its
//! provisioning files and the dashboard they load are checked as files. Grafana's
//! rules they rely on: provisioning files are YAML with `apiVersion: 1`; a dashboard
//! loaded by file provisioning keeps `${DS_...}` placeholders unresolved (only the
//! import dialog fills them), so its panels must name their data source through a
//! `datasource` template variable; such a variable starts on the option whose uid is
//! its `current.value` (else whose name is its `current.text`).
//!
//! Every dashboard query is checked against a real Prometheus in `metrics.rs`.

use std::path::{Path, PathBuf};

use serde_json::Value as Json;
use serde_yaml::Value as Yaml;

fn repo(path: &str) -> PathBuf {
    flockmq_tests::repo_root().join(path)
}

fn yaml(path: &Path) -> Yaml {
    let text = std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    serde_yaml::from_str(&text).unwrap_or_else(|e| panic!("{} is not YAML: {e}", path.display()))
}

fn strings(value: &Yaml) -> Vec<&str> {
    value
        .as_sequence()
        .map(|s| s.iter().filter_map(Yaml::as_str).collect())
        .unwrap_or_default()
}

/// The compose file's services.
fn services() -> Yaml {
    yaml(&repo("docker-compose.yml"))["services"].clone()
}

/// `${NAME:-default}`: the default, if `value` is exactly that.
fn variable_default<'a>(value: &'a str, name: &str) -> Option<&'a str> {
    value
        .strip_prefix(&format!("${{{name}:-"))?
        .strip_suffix('}')
}

/// The grafana service's bind mounts: (host path from the repository root, path in
/// the container).
fn grafana_mounts() -> Vec<(String, String)> {
    strings(&services()["grafana"]["volumes"])
        .into_iter()
        .map(|v| {
            let mut parts = v.split(':');
            let host = parts.next().expect("host path").to_owned();
            let container = parts.next().unwrap_or_else(|| panic!("no target in {v}"));
            assert!(
                host.starts_with("./"),
                "grafana mounts files of the repository, not {host}"
            );
            assert_eq!(parts.next(), Some("ro"), "{v} is mounted read-only");
            (
                host.trim_start_matches("./").to_owned(),
                container.to_owned(),
            )
        })
        .collect()
}

/// Where a path inside the grafana container comes from in the repository.
fn host_path_of(container_path: &str) -> PathBuf {
    let (host, target) = grafana_mounts()
        .into_iter()
        .find(|(_, target)| {
            container_path == target || container_path.starts_with(&format!("{target}/"))
        })
        .unwrap_or_else(|| panic!("nothing is mounted at {container_path}"));
    repo(&host).join(container_path[target.len()..].trim_start_matches('/'))
}

/// The `key` entries of every provisioning file in the container's `dir`, each file
/// checked to be of `apiVersion: 1`.
fn provisioned(dir: &str, key: &str) -> Vec<Yaml> {
    let dir = host_path_of(dir);
    let mut found = Vec::new();
    for entry in std::fs::read_dir(&dir).expect("the provisioning directory") {
        let path = entry.expect("entry").path();
        let doc = yaml(&path);
        assert_eq!(doc["apiVersion"], Yaml::from(1), "{}", path.display());
        found.extend(doc[key].as_sequence().cloned().unwrap_or_default());
    }
    found
}

/// The provisioned data sources.
fn datasources() -> Vec<Yaml> {
    provisioned("/etc/grafana/provisioning/datasources", "datasources")
}

fn dashboard() -> Json {
    let path = repo("helm/grafana/flockmq-dashboard.json");
    serde_json::from_str(&std::fs::read_to_string(&path).expect("read the dashboard"))
        .expect("the dashboard is JSON")
}

#[test]
fn the_monitoring_profile_runs_grafana_from_a_pinnable_image_on_the_publish_address() {
    let services = services();
    let grafana = &services["grafana"];
    assert_eq!(strings(&grafana["profiles"]), ["monitoring"]);
    let image = grafana["image"].as_str().expect("an image");
    let default = variable_default(image, "GRAFANA_IMAGE")
        .unwrap_or_else(|| panic!("the image {image} is not ${{GRAFANA_IMAGE:-...}}"));
    let tag = default.rsplit_once(':').map(|(_, tag)| tag);
    assert!(
        tag.is_some_and(|t| !t.is_empty() && t != "latest"),
        "the default image {default} is pinned to a version"
    );
    let ports = strings(&grafana["ports"]);
    assert!(!ports.is_empty(), "grafana publishes its port");
    for port in ports {
        let rest = port
            .strip_prefix("${PUBLISH_ADDR:-127.0.0.1}:")
            .unwrap_or_else(|| panic!("{port} is not bound to PUBLISH_ADDR (127.0.0.1)"));
        assert!(rest.ends_with(":3000"), "{port} publishes Grafana's 3000");
    }
    assert!(
        strings(&grafana["depends_on"]).contains(&"prometheus"),
        "grafana starts after prometheus"
    );
    // Prometheus is in the same profile: Grafana's data source is there with it.
    assert_eq!(strings(&services["prometheus"]["profiles"]), ["monitoring"]);
    for (host, target) in grafana_mounts() {
        assert!(
            repo(&host).exists(),
            "{host} (mounted at {target}) is in the repository"
        );
    }
}

#[test]
fn grafanas_data_source_is_the_compose_prometheus_under_the_uid_the_dashboard_selects() {
    let sources = datasources();
    let prometheus: Vec<&Yaml> = sources
        .iter()
        .filter(|d| d["type"].as_str() == Some("prometheus"))
        .collect();
    assert_eq!(
        prometheus.len(),
        1,
        "one Prometheus data source: {sources:?}"
    );
    let source = prometheus[0];
    assert_eq!(source["isDefault"], Yaml::from(true));
    // The URL names the compose Prometheus service on the port it listens on.
    let url = source["url"].as_str().expect("a url");
    let services = services();
    let (host, port) = url
        .strip_prefix("http://")
        .and_then(|a| a.split_once(':'))
        .unwrap_or_else(|| panic!("{url} is not http://HOST:PORT"));
    assert!(
        services[host]["image"]
            .as_str()
            .and_then(|i| variable_default(i, "PROMETHEUS_IMAGE"))
            .is_some(),
        "{url} names the compose Prometheus service"
    );
    assert!(
        strings(&services[host]["ports"])
            .iter()
            .any(|p| p.ends_with(&format!(":{port}"))),
        "Prometheus listens on {port} in its container"
    );
    // The dashboard's data source variable starts on the import's input
    // (`${DS_PROMETHEUS}`, which Grafana's import replaces by the source the user
    // picks). File provisioning replaces nothing: the variable finds no source of
    // that uid or name and takes the first Prometheus source, here the only one.
    let dashboard = dashboard();
    let input = dashboard["__inputs"]
        .as_array()
        .expect("import inputs")
        .iter()
        .find(|i| i["type"] == "datasource" && i["pluginId"] == "prometheus")
        .expect("a Prometheus data source input");
    let placeholder = format!("${{{}}}", input["name"].as_str().expect("its name"));
    let variable = dashboard["templating"]["list"]
        .as_array()
        .expect("template variables")
        .iter()
        .find(|v| v["type"] == "datasource")
        .expect("a datasource variable");
    assert_eq!(
        variable["query"], "prometheus",
        "it lists Prometheus sources"
    );
    assert_eq!(
        variable["current"]["value"],
        placeholder.as_str(),
        "{variable}"
    );
    let uid = source["uid"].as_str().expect("a fixed uid");
    assert_ne!(
        uid, placeholder,
        "the provisioned source is not taken for the input"
    );
}

#[test]
fn the_dashboard_provider_loads_the_flockmq_dashboard_from_its_mount() {
    let providers = provisioned("/etc/grafana/provisioning/dashboards", "providers");
    assert_eq!(providers.len(), 1, "{providers:?}");
    let provider = &providers[0];
    assert_eq!(provider["type"], Yaml::from("file"));
    let path = provider["options"]["path"].as_str().expect("options.path");
    let loaded = host_path_of(path);
    assert_eq!(
        std::fs::canonicalize(loaded.join("flockmq-dashboard.json")).expect("the dashboard"),
        std::fs::canonicalize(repo("helm/grafana/flockmq-dashboard.json")).expect("it exists"),
    );
    // Every JSON file there is a dashboard Grafana will load.
    for entry in std::fs::read_dir(&loaded).expect("the dashboards") {
        let path = entry.expect("entry").path();
        if path.extension().is_some_and(|e| e == "json") {
            let json: Json = serde_json::from_str(&std::fs::read_to_string(&path).expect("read"))
                .unwrap_or_else(|e| panic!("{} is not JSON: {e}", path.display()));
            assert!(json["panels"].is_array(), "{} has panels", path.display());
        }
    }
    // The home dashboard the compose file names is that file.
    let home = services()["grafana"]["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
        .as_str()
        .map(host_path_of);
    if let Some(home) = home {
        assert!(home.is_file(), "{} is the home dashboard", home.display());
    }
}

/// Every panel, those inside collapsed rows included.
fn panels(dashboard: &Json) -> Vec<&Json> {
    let mut all = Vec::new();
    for panel in dashboard["panels"].as_array().expect("panels") {
        all.push(panel);
        all.extend(panel["panels"].as_array().into_iter().flatten());
    }
    all
}

#[test]
fn every_panel_and_query_of_the_dashboard_names_its_data_source_through_the_variable() {
    let dashboard = dashboard();
    let variables = dashboard["templating"]["list"]
        .as_array()
        .expect("variables");
    let name = variables
        .iter()
        .find(|v| v["type"] == "datasource")
        .and_then(|v| v["name"].as_str())
        .expect("a datasource variable");
    let through_variable = serde_json::json!({"type": "prometheus", "uid": format!("${{{name}}}")});
    let mut checked = 0;
    for panel in panels(&dashboard) {
        let targets = panel["targets"].as_array().into_iter().flatten();
        if panel["type"] == "row" && panel["targets"].is_null() {
            assert!(panel["datasource"].is_null(), "row {}", panel["title"]);
            continue;
        }
        assert_eq!(
            panel["datasource"], through_variable,
            "panel {}",
            panel["title"]
        );
        for target in targets {
            assert_eq!(
                target["datasource"], through_variable,
                "a query of panel {}",
                panel["title"]
            );
            checked += 1;
        }
    }
    assert!(checked > 30, "{checked} queries");
    // The query variables list their values from the same source.
    for variable in variables.iter().filter(|v| v["type"] == "query") {
        assert_eq!(variable["datasource"], through_variable, "{variable}");
    }
    // `${DS_...}` placeholders are for the import dialog: declared in `__inputs`, and
    // used only as the data source variable's starting value, which a provisioned
    // dashboard (nothing replaced) does not find and so falls back from. Anywhere
    // else they would stay unresolved.
    let inputs = dashboard["__inputs"].as_array().expect("__inputs");
    assert!(
        inputs
            .iter()
            .any(|i| i["type"] == "datasource" && i["pluginId"] == "prometheus"),
        "{inputs:?}"
    );
    let mut rest = dashboard.clone();
    rest.as_object_mut().expect("an object").remove("__inputs");
    for v in rest["templating"]["list"]
        .as_array_mut()
        .expect("template variables")
        .iter_mut()
        .filter(|v| v["type"] == "datasource")
    {
        v.as_object_mut().expect("an object").remove("current");
    }
    let text = rest.to_string();
    assert!(
        !text.contains("${DS_"),
        "a ${{DS_...}} placeholder outside __inputs"
    );
}
