//! `deploy/kubernetes/`: every manifest parses; the Deployment probes the daemon's
//! health endpoints on its metrics port; the config file `--config` names, and every file
//! that config names, are in a mounted ConfigMap or Secret; and the ConfigMap's config and
//! rules are ones the daemon loads.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use serde::Deserialize;
use serde_json::Value;

const DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/kubernetes");

/// The paths the daemon's listener serves, from its router (`src/serve.rs`), whose
/// unit test requests each: a probe may point at any but `/metrics`.
fn health_paths() -> Vec<&'static str> {
    wal2cache::serve::PATHS
        .into_iter()
        .filter(|p| *p == "/healthz" || *p == "/readyz")
        .collect()
}

/// Every document of every `*.yaml`/`*.yml` in the directory, with its file name.
fn manifests() -> Vec<(String, Value)> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(DIR)
        .unwrap_or_else(|e| panic!("{DIR}: {e}"))
        .map(|e| e.unwrap().path())
        .filter(|p| matches!(p.extension().and_then(|e| e.to_str()), Some("yaml" | "yml")))
        .collect();
    files.sort();
    let mut docs = Vec::new();
    for file in files {
        let name = file.file_name().unwrap().to_string_lossy().into_owned();
        let text = std::fs::read_to_string(&file).unwrap();
        for (i, doc) in serde_yaml_ng::Deserializer::from_str(&text).enumerate() {
            let value = Value::deserialize(doc)
                .unwrap_or_else(|e| panic!("{name}, document {}: {e}", i + 1));
            // An empty document (a trailing `---`) is no manifest.
            if !value.is_null() {
                docs.push((name.clone(), value));
            }
        }
    }
    docs
}

/// The one manifest of `kind` (and `name`, when given).
fn find<'a>(docs: &'a [(String, Value)], kind: &str, name: Option<&str>) -> &'a Value {
    let found: Vec<&Value> = docs
        .iter()
        .map(|(_, d)| d)
        .filter(|d| d["kind"] == kind)
        .filter(|d| name.is_none_or(|n| d["metadata"]["name"] == n))
        .collect();
    assert_eq!(found.len(), 1, "manifests of kind {kind} named {name:?}");
    found[0]
}

fn str_at<'a>(v: &'a Value, pointer: &str) -> &'a str {
    v.pointer(pointer)
        .and_then(Value::as_str)
        .unwrap_or_else(|| panic!("no string at {pointer} in {}", short(v)))
}

fn short(v: &Value) -> String {
    format!(
        "{} {}",
        v["kind"].as_str().unwrap_or("?"),
        v["metadata"]["name"].as_str().unwrap_or("?")
    )
}

fn deployment(docs: &[(String, Value)]) -> &Value {
    find(docs, "Deployment", None)
}

/// The daemon's container: the one whose args start with `run`.
fn container(deployment: &Value) -> &Value {
    let containers = deployment
        .pointer("/spec/template/spec/containers")
        .and_then(Value::as_array)
        .expect("spec.template.spec.containers");
    let runs: Vec<&Value> = containers
        .iter()
        .filter(|c| c.pointer("/args/0").and_then(Value::as_str) == Some("run"))
        .collect();
    assert_eq!(runs.len(), 1, "one container runs `wal2cache run`");
    runs[0]
}

fn args(container: &Value) -> Vec<&str> {
    container["args"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().expect("args are strings"))
        .collect()
}

/// The value after `--config` in the container's args.
fn config_arg(container: &Value) -> String {
    let args = args(container);
    let at = args
        .iter()
        .position(|a| *a == "--config")
        .unwrap_or_else(|| panic!("args without --config: {args:?}"));
    args.get(at + 1)
        .unwrap_or_else(|| panic!("--config without a path: {args:?}"))
        .to_string()
}

fn env_value<'a>(container: &'a Value, name: &str) -> Option<&'a str> {
    container["env"]
        .as_array()?
        .iter()
        .find(|e| e["name"] == name)
        .and_then(|e| e["value"].as_str())
}

/// A mount of the container: where, and the files the volume holds (its keys, or the
/// paths its `items` give them).
struct Mount {
    path: String,
    files: BTreeMap<String, String>,
}

/// The container's volume mounts, each with the content of the ConfigMap or Secret
/// behind it (from this directory's manifests: the Secret's is the example's).
fn mounts(docs: &[(String, Value)], deployment: &Value, container: &Value) -> Vec<Mount> {
    let volumes = deployment
        .pointer("/spec/template/spec/volumes")
        .and_then(Value::as_array)
        .expect("spec.template.spec.volumes");
    let mut mounts = Vec::new();
    for mount in container["volumeMounts"].as_array().expect("volumeMounts") {
        let name = mount["name"].as_str().unwrap();
        let path = mount["mountPath"].as_str().unwrap().to_string();
        assert!(
            mount.get("subPath").is_none(),
            "volume {name} is mounted with subPath: the kubelet never updates such a file"
        );
        let volume = volumes
            .iter()
            .find(|v| v["name"] == name)
            .unwrap_or_else(|| panic!("volumeMount {name} has no volume"));
        let (data, items) = if let Some(cm) = volume.get("configMap") {
            let object = find(docs, "ConfigMap", Some(str_at(cm, "/name")));
            (string_map(&object["data"]), &cm["items"])
        } else if let Some(secret) = volume.get("secret") {
            let object = find(docs, "Secret", Some(str_at(secret, "/secretName")));
            // stringData as written; data is base64, which no example should need.
            assert!(
                object.get("data").is_none(),
                "{}: use stringData in the example",
                short(object)
            );
            (string_map(&object["stringData"]), &secret["items"])
        } else {
            panic!("volume {name}: neither a configMap nor a secret: {volume}");
        };
        let files = match items.as_array() {
            None => data,
            Some(items) => items
                .iter()
                .map(|i| {
                    let key = str_at(i, "/key");
                    let content = data
                        .get(key)
                        .unwrap_or_else(|| panic!("volume {name}: items name {key}, not there"));
                    (str_at(i, "/path").to_string(), content.clone())
                })
                .collect(),
        };
        mounts.push(Mount { path, files });
    }
    mounts
}

fn string_map(v: &Value) -> BTreeMap<String, String> {
    v.as_object()
        .map(|o| {
            o.iter()
                .map(|(k, v)| (k.clone(), v.as_str().expect("string values").to_string()))
                .collect()
        })
        .unwrap_or_default()
}

/// The pod's filesystem as far as the mounts go, under `root`: each mount's files at
/// `root` + mount path.
fn materialize(root: &Path, mounts: &[Mount]) {
    for mount in mounts {
        let dir = root.join(mount.path.trim_start_matches('/'));
        for (file, content) in &mount.files {
            let path = dir.join(file);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(&path, content).unwrap();
        }
    }
}

#[test]
fn every_manifest_has_api_version_kind_and_name() {
    let docs = manifests();
    for (file, doc) in &docs {
        for pointer in ["/apiVersion", "/kind", "/metadata/name"] {
            assert!(
                doc.pointer(pointer)
                    .and_then(Value::as_str)
                    .is_some_and(|s| !s.is_empty()),
                "{file}: no {pointer}"
            );
        }
    }
    let kinds: BTreeSet<&str> = docs
        .iter()
        .map(|(_, d)| d["kind"].as_str().unwrap())
        .collect();
    for kind in ["Deployment", "ConfigMap", "Service", "Secret"] {
        assert!(kinds.contains(kind), "no {kind} among {kinds:?}");
    }
}

#[test]
fn probes_use_the_health_endpoints_on_the_metrics_port() {
    let docs = manifests();
    let deployment = deployment(&docs);
    let container = container(deployment);
    let ports: Vec<(Option<&str>, u64)> = container["ports"]
        .as_array()
        .expect("the container declares its ports")
        .iter()
        .map(|p| (p["name"].as_str(), p["containerPort"].as_u64().unwrap()))
        .collect();
    let port_number = |port: &Value| -> u64 {
        match port {
            Value::String(name) => {
                ports
                    .iter()
                    .find(|(n, _)| *n == Some(name.as_str()))
                    .unwrap_or_else(|| panic!("port {name} is not among the container's {ports:?}"))
                    .1
            }
            Value::Number(n) => {
                let n = n.as_u64().unwrap();
                assert!(
                    ports.iter().any(|(_, p)| *p == n),
                    "port {n} is not declared"
                );
                n
            }
            other => panic!("a port is a name or a number, not {other}"),
        }
    };

    let mut probed = BTreeSet::new();
    for probe in ["livenessProbe", "readinessProbe", "startupProbe"] {
        let Some(p) = container.get(probe) else {
            assert_ne!(probe, "livenessProbe", "no livenessProbe");
            assert_ne!(probe, "readinessProbe", "no readinessProbe");
            continue;
        };
        let path = str_at(p, "/httpGet/path");
        assert!(
            health_paths().contains(&path),
            "{probe} on {path}: the daemon serves {:?}",
            wal2cache::serve::PATHS
        );
        probed.insert(port_number(&p["httpGet"]["port"]));
    }
    // /readyz answers 503 on a standby: as liveness it would restart every standby.
    assert_eq!(
        str_at(container, "/livenessProbe/httpGet/path"),
        "/healthz",
        "livenessProbe"
    );
    // With a standby beside the active, a readiness probe on /readyz leaves the standby
    // never Ready, and a rolling update waiting for its new (standby) pods never ends.
    if deployment["spec"]["replicas"].as_u64().unwrap_or(1) > 1 {
        assert_ne!(
            str_at(container, "/readinessProbe/httpGet/path"),
            "/readyz",
            "readinessProbe with more than one replica"
        );
    }

    // The daemon listens where the probes knock: metrics.listen from the environment,
    // on every address (the kubelet is outside the pod).
    let listen: std::net::SocketAddr = env_value(container, "WAL2CACHE__METRICS__LISTEN")
        .expect("env WAL2CACHE__METRICS__LISTEN")
        .parse()
        .expect("WAL2CACHE__METRICS__LISTEN is host:port");
    assert!(listen.ip().is_unspecified(), "metrics.listen = {listen}");
    assert_eq!(
        probed,
        BTreeSet::from([u64::from(listen.port())]),
        "the probes' ports and metrics.listen"
    );

    // The Service scrapes that port on these pods.
    let service = find(&docs, "Service", None);
    let pod_labels = &deployment["spec"]["template"]["metadata"]["labels"];
    for (k, v) in service["spec"]["selector"]
        .as_object()
        .expect("the Service selects pods")
    {
        assert_eq!(&pod_labels[k], v, "the Service's selector {k}");
    }
    let targets: Vec<u64> = service["spec"]["ports"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| port_number(&p["targetPort"]))
        .collect();
    assert_eq!(
        targets,
        [u64::from(listen.port())],
        "the Service's targetPort"
    );
}

#[test]
fn the_pod_runs_unprivileged_and_outlives_the_drain() {
    let docs = manifests();
    let deployment = deployment(&docs);
    let container = container(deployment);
    let pod = &deployment["spec"]["template"]["spec"];
    let run_as_non_root = pod
        .pointer("/securityContext/runAsNonRoot")
        .or_else(|| container.pointer("/securityContext/runAsNonRoot"));
    assert_eq!(run_as_non_root, Some(&Value::Bool(true)), "runAsNonRoot");
    let sc = &container["securityContext"];
    assert_eq!(sc["readOnlyRootFilesystem"], true, "readOnlyRootFilesystem");
    assert_eq!(
        sc["allowPrivilegeEscalation"], false,
        "allowPrivilegeEscalation"
    );
    assert_eq!(
        sc["capabilities"]["drop"],
        serde_json::json!(["ALL"]),
        "capabilities.drop"
    );
    // A drained stop needs pipeline.shutdown_timeout (the ConfigMap's, or the default)
    // before the kubelet's SIGKILL.
    let grace = pod["terminationGracePeriodSeconds"]
        .as_u64()
        .expect("terminationGracePeriodSeconds");
    let dir = tempfile::tempdir().unwrap();
    let config = load_configmap_config(&docs, dir.path());
    assert!(
        grace > config.pipeline.shutdown_timeout.as_secs(),
        "terminationGracePeriodSeconds {grace} must exceed pipeline.shutdown_timeout {:?}",
        config.pipeline.shutdown_timeout
    );
}

/// The ConfigMap's config as the pod would see it: every mount written under `root`,
/// the mount paths in the config rewritten to there, loaded with
/// `wal2cache::config::Config::load` (which reads the secret files it names).
fn load_configmap_config(docs: &[(String, Value)], root: &Path) -> wal2cache::config::Config {
    let deployment = deployment(docs);
    let container = container(deployment);
    let mounts = mounts(docs, deployment, container);
    materialize(root, &mounts);
    let config_path = config_arg(container);
    let local = root.join(config_path.trim_start_matches('/'));
    let text = std::fs::read_to_string(&local).unwrap_or_else(|_| {
        panic!("--config {config_path} is no file of a mounted ConfigMap or Secret")
    });
    let mut rewritten = text.clone();
    for mount in &mounts {
        let from = format!("{}/", mount.path.trim_end_matches('/'));
        let to = format!("{}{from}", root.display());
        rewritten = rewritten.replace(&from, &to);
    }
    std::fs::write(&local, rewritten).unwrap();
    wal2cache::config::Config::load(&local)
        .unwrap_or_else(|e| panic!("the ConfigMap's {config_path} does not load: {e}"))
}

#[test]
fn the_configmap_config_loads_with_every_file_it_names_mounted() {
    let docs = manifests();
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().canonicalize().unwrap();
    let config = load_configmap_config(&docs, &root);

    // Every file the config names: loaded from under `root`, so from a mount; existing,
    // so a key of the ConfigMap or Secret behind it.
    let mut files: Vec<(&str, PathBuf)> = vec![("rules.path", config.rules.path.clone())];
    files.extend(
        config
            .postgres
            .password_file
            .clone()
            .map(|f| ("postgres.password_file", f)),
    );
    let redis = config.redis.as_ref().expect("[redis]");
    for (key, file) in [
        ("redis.password_file", &redis.password_file),
        ("redis.ca_file", &redis.ca_file),
        ("redis.cert_file", &redis.cert_file),
        ("redis.key_file", &redis.key_file),
    ] {
        files.extend(file.clone().map(|f| (key, f)));
    }
    let kafka = config.kafka.as_ref().expect("[kafka]");
    files.extend(
        kafka
            .sasl_password_file
            .clone()
            .map(|f| ("kafka.sasl_password_file", f)),
    );
    let named: BTreeSet<&str> = files.iter().map(|(k, _)| *k).collect();
    for key in [
        "postgres.password_file",
        "redis.password_file",
        "kafka.sasl_password_file",
    ] {
        assert!(named.contains(key), "the ConfigMap's config sets no {key}");
    }
    for (key, file) in &files {
        let in_pod = file
            .strip_prefix(&root)
            .unwrap_or_else(|_| panic!("{key} = {}: not under a mounted volume", file.display()));
        assert!(
            file.is_file(),
            "{key} = /{}: no such key in the ConfigMap or Secret mounted there",
            in_pod.display()
        );
    }

    // `run` needs both sinks; the rules compile.
    config.sinks().unwrap_or_else(|e| panic!("{e}"));
    let rules = wal2cache::rules::load(&config.rules.path)
        .unwrap_or_else(|e| panic!("the ConfigMap's rules: {e}"));
    assert!(
        !rules.rules().is_empty(),
        "the ConfigMap's rules hold no rule"
    );

    // The environment override names a key the config has (WAL2CACHE__METRICS__LISTEN
    // is metrics.listen).
    assert!(
        config.metrics.listen.is_some(),
        "the pod overrides metrics.listen, which the file should also set (for a plain host)"
    );
}

#[test]
fn the_example_secret_holds_placeholders_only() {
    let docs = manifests();
    let secret = find(&docs, "Secret", None);
    let values = string_map(&secret["stringData"]);
    assert!(!values.is_empty(), "the example Secret has no stringData");
    for (key, value) in values {
        assert!(
            value.contains("FAKE") && value.contains("CHANGE-ME"),
            "{key}: an example value must say it is fake: {value:?}"
        );
    }
}
