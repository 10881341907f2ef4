//! The ECS guide (`docs/guides/ecs.md`) followed on loopback, with moto standing in for Cloud
//! Map: the namespace and service are created through the real AWS SDK; the web task's
//! registrar script runs as written (a stand-in ECS task metadata endpoint, and an `aws` on
//! `PATH` that records its calls, which the test then makes against moto with the SDK); the
//! controller runs the `command` of `task-definition-controller.json` and the proxies the entry
//! points, commands, `environment` and `secrets` of the web and client task definitions. Only
//! addresses move (to free ports on 127.0.0.1), plus EFS's `/etc/trellis` (a temporary
//! directory), the proxy's token file (there) and the Cloud Map service id (moto's).
//!
//! And, without moto: `iam-controller-policy.json` lists exactly the Cloud Map operations the
//! adapter's source sends.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context as _, bail, ensure};
use serde_json::Value;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use trellis_guides::hosts::{Hosts, free_port};
use trellis_guides::process::{Process, bin_dir, binary, terminate};
use trellis_guides::{guide, read, workspace_root};

const GUIDE: &str = "docs/guides/ecs.md";
const DEPLOY: &str = "deploy/ecs";
const NAMESPACE: &str = "shop";
const REGION: &str = "eu-west-1";
/// The task's id in the stand-in metadata (the last part of its ARN).
const TASK_ID: &str = "0123456789abcdef0123456789abcdef";

fn task_definition(name: &str) -> anyhow::Result<Value> {
    Ok(serde_json::from_str(&read(&format!("{DEPLOY}/{name}"))?)?)
}

fn container<'a>(task: &'a Value, name: &str) -> anyhow::Result<&'a Value> {
    task["containerDefinitions"]
        .as_array()
        .context("containerDefinitions")?
        .iter()
        .find(|c| c["name"] == name)
        .with_context(|| format!("no container {name}"))
}

fn strings(v: &Value) -> Vec<String> {
    v.as_array()
        .map(|a| {
            a.iter()
                .filter_map(|s| s.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

/// A container's `environment` as `(name, value)`, values moved to the task's host.
fn environment(
    container: &Value,
    hosts: &mut Hosts,
    task: &str,
) -> anyhow::Result<Vec<(String, String)>> {
    let mut env = Vec::new();
    for e in container["environment"].as_array().into_iter().flatten() {
        let name = e["name"].as_str().context("environment name")?;
        let value = e["value"].as_str().context("environment value")?;
        env.push((name.to_owned(), hosts.rewrite(task, value)?));
    }
    Ok(env)
}

fn set(env: &mut Vec<(String, String)>, name: &str, value: impl Into<String>) {
    env.retain(|(k, _)| k != name);
    env.push((name.to_owned(), value.into()));
}

/// The command ECS starts a container with: `entryPoint` + `command`, addresses moved.
fn container_command(
    container: &Value,
    hosts: &mut Hosts,
    task: &str,
) -> anyhow::Result<Vec<String>> {
    strings(&container["entryPoint"])
        .into_iter()
        .chain(strings(&container["command"]))
        .map(|w| hosts.rewrite(task, &w))
        .collect()
}

/// A container's process: its command with `env` (plus the `secrets` given as variables, as ECS
/// injects them), the workspace binaries and the stand-ins first on `PATH`.
fn start_container(
    name: &str,
    command: &[String],
    mut env: Vec<(String, String)>,
    path_first: &[&Path],
    scratch: &Path,
) -> anyhow::Result<Process> {
    let mut path: Vec<String> = path_first.iter().map(|p| p.display().to_string()).collect();
    path.extend(["/usr/local/bin", "/usr/bin", "/bin"].map(str::to_owned));
    set(&mut env, "PATH", path.join(":"));
    let program = command.first().context("an empty command")?;
    Process::spawn(
        name,
        Path::new(program),
        &command[1..],
        &env,
        scratch,
        &scratch.join("logs"),
    )
}

/// Starts `moto_server` on a free port and waits until it accepts connections.
async fn start_moto(exe: &Path, scratch: &Path) -> anyhow::Result<(Process, String)> {
    let port = free_port();
    let moto = Process::spawn(
        "moto",
        exe,
        &[
            "-H".into(),
            "127.0.0.1".into(),
            "-p".into(),
            port.to_string(),
        ],
        &[],
        scratch,
        &scratch.join("logs"),
    )?;
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while tokio::net::TcpStream::connect(addr).await.is_err() {
        ensure!(
            tokio::time::Instant::now() < deadline,
            "moto did not listen within 20 s: {}",
            moto.tail(10)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok((moto, format!("http://{addr}")))
}

/// The ECS task metadata endpoint (v4) of one task, pretty-printed as AWS's examples are (the
/// registrar must not depend on the layout): `GET /task`.
async fn metadata_endpoint(ip: &str) -> anyhow::Result<SocketAddr> {
    let task = serde_json::json!({
        "Cluster": "arn:aws:ecs:eu-west-1:123456789012:cluster/trellis",
        "TaskARN": format!("arn:aws:ecs:eu-west-1:123456789012:task/trellis/{TASK_ID}"),
        "Family": "web",
        "Containers": [{
            "Name": "cloudmap-registrar",
            "Networks": [{"NetworkMode": "awsvpc", "IPv4Addresses": [ip]}]
        }]
    });
    let body = serde_json::to_string_pretty(&task)?;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let body = body.clone();
            tokio::spawn(async move {
                let mut head = [0u8; 2048];
                let n = stream.read(&mut head).await.unwrap_or(0);
                let asked = String::from_utf8_lossy(&head[..n]).into_owned();
                let reply = if asked.starts_with("GET /v4/meta/task ") {
                    format!(
                        "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                        body.len()
                    )
                } else {
                    "HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                        .to_owned()
                };
                let _ = stream.write_all(reply.as_bytes()).await;
            });
        }
    });
    Ok(addr)
}

/// An `aws` for `PATH` that appends each call to `log` (one argument per line, a blank line
/// after each call) and succeeds.
fn aws_stand_in(dir: &Path, log: &Path) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::create_dir_all(dir)?;
    let script = format!(
        "#!/bin/sh\n# Stands in for the AWS CLI in the guides test: records the call.\nfor arg in \"$@\"; do printf '%s\\n' \"$arg\"; done >> '{0}'\necho >> '{0}'\n",
        log.display()
    );
    let path = dir.join("aws");
    std::fs::write(&path, script)?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755))?;
    Ok(())
}

/// The calls recorded by the stand-in `aws`, each as its arguments.
fn recorded_calls(log: &Path) -> Vec<Vec<String>> {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .split("\n\n")
        .filter(|c| !c.trim().is_empty())
        .map(|c| c.lines().map(str::to_owned).collect())
        .collect()
}

/// `--flag VALUE` of a recorded call.
fn flag<'a>(call: &'a [String], name: &str) -> anyhow::Result<&'a str> {
    call.iter()
        .position(|a| a == name)
        .and_then(|i| call.get(i + 1))
        .map(String::as_str)
        .with_context(|| format!("{name} in {call:?}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_ecs_guide_gives_a_mesh_of_tasks_found_in_cloud_map() -> anyhow::Result<()> {
    let Some(moto_exe) = std::env::var_os("TRELLIS_MOTO_SERVER") else {
        println!(
            "skipped: TRELLIS_MOTO_SERVER is unset (scripts/test installs moto[server] and sets it)"
        );
        return Ok(());
    };
    guide::require_tool("openssl", "the guide makes the CA and the tokens with it")?;
    guide::require_tool(
        "curl",
        "the web task's registrar reads the task metadata with it",
    )?;
    let bin = bin_dir()?;
    let echo = binary("trellis-echo", "trellis-echo")?;
    binary("trellis", "trellis-cli")?;
    binary("trellis-proxy", "trellis-proxy")?;
    let scratch_dir = tempfile::tempdir()?;
    let scratch = scratch_dir.path();
    std::fs::create_dir_all(scratch.join("logs"))?;

    // The controller's EFS volume, mounted at /etc/trellis: the CA as the Consul guide makes it,
    // the tokens as this guide's block makes them, the policy.
    let controller_task = task_definition("task-definition-controller.json")?;
    let controller = container(&controller_task, "trellis-controller")?;
    let mount = controller["mountPoints"][0]["containerPath"]
        .as_str()
        .context("the controller's mount point")?;
    ensure!(mount == guide::ETC_TRELLIS, "EFS is mounted at {mount}");
    let efs = scratch.join("efs");
    std::fs::create_dir_all(&efs)?;
    guide::run(
        &guide::block("docs/guides/consul.md", "ca")?,
        &efs,
        &workspace_root(),
        &bin,
    )?;
    guide::run(&guide::block(GUIDE, "tokens")?, &efs, &efs, &bin)?;
    copy_dir(
        &workspace_root().join(DEPLOY).join("policy"),
        &efs.join("policy"),
    )?;

    // Cloud Map (moto): the namespace and the service, as the guide's commands create them.
    let (_moto, moto_url) = start_moto(Path::new(&moto_exe), scratch).await?;
    let options = trellis_adapter_cloudmap::CloudMapOptions {
        endpoint_url: Some(moto_url.clone()),
        region: Some(REGION.into()),
        credentials: Some(trellis_adapter_cloudmap::StaticCredentials::new(
            "test", "test",
        )),
        ..Default::default()
    };
    let cloudmap = trellis_adapter_cloudmap::explicit_client(&options);
    cloudmap
        .create_http_namespace()
        .name(NAMESPACE)
        .send()
        .await?;
    let namespaces = cloudmap.list_namespaces().send().await?;
    let namespace_id = namespaces
        .namespaces()
        .iter()
        .find(|n| n.name() == Some(NAMESPACE))
        .and_then(|n| n.id())
        .context("the namespace shop")?
        .to_owned();
    let service = cloudmap
        .create_service()
        .name("web")
        .namespace_id(&namespace_id)
        .send()
        .await?;
    let service_id = service
        .service()
        .and_then(|s| s.id())
        .context("the service id")?
        .to_owned();

    // The hosts: the controller task, and the name proxies reach it by.
    let mut hosts = Hosts::new();
    let web_task = task_definition("task-definition-web.json")?;
    let client_task = task_definition("task-definition-client.json")?;
    let controller_url = container(&web_task, "trellis-proxy")?["environment"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|e| e["name"] == "TRELLIS_PROXY_CONTROLLER")
        .and_then(|e| e["value"].as_str())
        .context("TRELLIS_PROXY_CONTROLLER")?;
    let controller_host = controller_url
        .trim_start_matches("https://")
        .split(':')
        .next()
        .context("the controller's host name")?;
    hosts.name(controller_host, "controller");

    // The controller task: its command; EFS and Cloud Map's endpoint moved.
    let mut command = Vec::new();
    // The serving certificate's name is the controller's DNS name, which the test moves to the
    // controller host's loopback address (what the proxies' rewritten URLs say).
    let controller_ip = hosts.at("controller", 8090).ip().to_string();
    for word in strings(&controller["command"]) {
        let word = if word == controller_host {
            controller_ip.clone()
        } else {
            hosts.rewrite("controller", &word)?
        };
        let word = word.replace(guide::ETC_TRELLIS, &efs.display().to_string());
        command.push(if word == format!("cloudmap={NAMESPACE}") {
            format!("{word},endpoint={moto_url}")
        } else {
            word
        });
    }
    let mut env = environment(controller, &mut hosts, "controller")?;
    // What the task role gives through the standard chain (moto accepts any keys).
    set(&mut env, "AWS_ACCESS_KEY_ID", "test");
    set(&mut env, "AWS_SECRET_ACCESS_KEY", "test");
    set(&mut env, "AWS_EC2_METADATA_DISABLED", "true");
    let mut controller_process = start_container("controller", &command, env, &[&bin], scratch)?;
    let admin = controller_process
        .wait_for("admin listening on")
        .await?
        .trim()
        .trim_start_matches("admin listening on ")
        .to_owned();

    // The web task: the app, the proxy (its token from "Secrets Manager"), the registrar.
    let app_env = environment(container(&web_task, "web")?, &mut hosts, "web-task")?;
    let app: SocketAddr = trellis_guides::var(&app_env, "LISTEN_ADDR")?.parse()?;
    let mut app_process = Process::spawn(
        "web-app",
        &echo,
        &[
            "--listen".into(),
            app.to_string(),
            "--service".into(),
            "web".into(),
        ],
        &[],
        scratch,
        &scratch.join("logs"),
    )?;
    app_process.wait_for("listening on").await?;
    let mut proxies = Vec::new();
    for (task, task_name, workload) in [
        (&web_task, "web-task", "web"),
        (&client_task, "client-task", "client"),
    ] {
        let proxy = container(task, "trellis-proxy")?;
        let mut env = environment(proxy, &mut hosts, task_name)?;
        let token_file = scratch.join(format!("{task_name}-token"));
        set(
            &mut env,
            "TRELLIS_PROXY_IDENTITY_TOKEN_FILE",
            token_file.display().to_string(),
        );
        let anchors_file = scratch.join(format!("{task_name}-anchors.pem"));
        set(
            &mut env,
            "TRELLIS_PROXY_CONTROLLER_CA",
            anchors_file.display().to_string(),
        );
        for secret in proxy["secrets"].as_array().into_iter().flatten() {
            let name = secret["name"].as_str().context("secret name")?;
            let from = secret["valueFrom"].as_str().unwrap_or_default();
            // The mesh's trust anchors (an SSM parameter) or the workload's token.
            let value = if name == "TRELLIS_CONTROLLER_ANCHORS" {
                ensure!(
                    from.ends_with(&format!(":parameter/trellis/{NAMESPACE}/anchors")),
                    "{task_name}'s anchors parameter: {secret}"
                );
                std::fs::read_to_string(efs.join("ca/anchors.pem"))?
            } else {
                ensure!(
                    from.ends_with(&format!("/{NAMESPACE}/{workload}")),
                    "{task_name}'s token secret: {secret}"
                );
                std::fs::read_to_string(efs.join(format!("{workload}.token")))?
            };
            set(&mut env, name, value);
        }
        let command = container_command(proxy, &mut hosts, task_name)?;
        let mut process = start_container(
            &format!("{task_name}-proxy"),
            &command,
            env,
            &[&bin],
            scratch,
        )?;
        process.wait_for("trellis-proxy started").await?;
        let token = std::fs::metadata(&token_file)?;
        ensure!(
            std::os::unix::fs::PermissionsExt::mode(&token.permissions()) & 0o077 == 0,
            "{task_name}'s token file is readable by others"
        );
        proxies.push(process);
    }

    let metadata = metadata_endpoint("127.0.0.1").await?;
    let stand_in = scratch.join("stand-in-bin");
    let aws_log = scratch.join("aws-calls.log");
    aws_stand_in(&stand_in, &aws_log)?;
    let registrar = container(&web_task, "cloudmap-registrar")?;
    let mut env = environment(registrar, &mut hosts, "web-task")?;
    set(&mut env, "CLOUDMAP_SERVICE_ID", service_id.clone());
    // A bare port, the proxy's inbound one: moved with the task's other addresses.
    let written_port: u16 = trellis_guides::var(&env, "CLOUDMAP_PORT")?.parse()?;
    let port = hosts.at("web-task", written_port).port();
    set(&mut env, "CLOUDMAP_PORT", port.to_string());
    set(
        &mut env,
        "ECS_CONTAINER_METADATA_URI_V4",
        format!("http://{metadata}/v4/meta"),
    );
    let command = container_command(registrar, &mut hosts, "web-task")?;
    let mut registrar_process = start_container("registrar", &command, env, &[&stand_in], scratch)?;
    registrar_process.wait_for("registered ").await?;
    let calls = recorded_calls(&aws_log);
    let [register] = calls.as_slice() else {
        bail!("expected one aws call, got {calls:?}");
    };
    ensure!(
        register[..2] == ["servicediscovery", "register-instance"],
        "{register:?}"
    );
    ensure!(flag(register, "--service-id")? == service_id);
    ensure!(flag(register, "--instance-id")? == TASK_ID);
    let attributes: BTreeMap<String, String> = flag(register, "--attributes")?
        .split(',')
        .map(|kv| {
            kv.split_once('=')
                .map(|(k, v)| (k.to_owned(), v.to_owned()))
                .with_context(|| format!("attribute {kv:?}"))
        })
        .collect::<anyhow::Result<_>>()?;
    let inbound = hosts.at("web-task", 15001);
    let expected: BTreeMap<String, String> = [
        ("AWS_INSTANCE_IPV4", "127.0.0.1".to_owned()),
        ("AWS_INSTANCE_PORT", inbound.port().to_string()),
        ("SERVICE_ACCOUNT", "web".to_owned()),
        ("version", "v1".to_owned()),
        ("protocol", "http".to_owned()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect();
    ensure!(
        attributes == expected,
        "registered attributes {attributes:?}"
    );
    // The recorded call, made against Cloud Map (moto).
    cloudmap
        .register_instance()
        .service_id(&service_id)
        .instance_id(TASK_ID)
        .set_attributes(Some(attributes.into_iter().collect()))
        .send()
        .await?;

    // client calls web through its HTTP proxy and its fixed port; web calling itself is refused.
    let client_http = hosts.at("client-task", 15080);
    trellis_guides::ExampleMesh {
        client_http,
        client_port: hosts.at("client-task", 15081),
        url: "http://web.shop/hello",
        refused: (
            hosts.at("web-task", 15080),
            "web -> web has no TrafficTarget",
        ),
        app,
        web_admin: hosts.at("web-task", 15000),
        min_handshakes: 1,
    }
    .check()
    .await?;
    let check = std::process::Command::new(bin.join("trellis"))
        .args(["check", "--admin", &admin])
        .output()?;
    let report = String::from_utf8_lossy(&check.stdout);
    ensure!(
        check.status.success() && report.contains("platform cloudmap:"),
        "trellis check: {report}"
    );

    // ECS stops the task: SIGTERM makes the registrar deregister and exit 0.
    terminate(&registrar_process)?;
    let status = registrar_process
        .exit_status(Duration::from_secs(10))
        .await?;
    ensure!(status.success(), "registrar after SIGTERM: {status}");
    let calls = recorded_calls(&aws_log);
    let deregister = calls.get(1).context("no deregister call")?;
    ensure!(
        deregister[..2] == ["servicediscovery", "deregister-instance"]
            && flag(deregister, "--service-id")? == service_id
            && flag(deregister, "--instance-id")? == TASK_ID,
        "{deregister:?}"
    );
    drop(proxies);
    Ok(())
}

fn copy_dir(from: &Path, to: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(to)?;
    for entry in std::fs::read_dir(from)? {
        let entry = entry?;
        std::fs::copy(entry.path(), to.join(entry.file_name()))?;
    }
    Ok(())
}

/// Every `.rs` file under `dir`.
fn sources(dir: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        if path.is_dir() {
            out.extend(sources(&path)?);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
    Ok(out)
}

#[test]
fn the_controller_iam_policy_allows_exactly_the_cloud_map_calls_the_adapter_makes()
-> anyhow::Result<()> {
    // An SDK operation is `client.<operation>()`, then builder calls, then `.send()`.
    let call = regex::Regex::new(r"(?s)client\s*\.\s*([a-z_]+)\s*\(\s*\)[^;]*?\.send\(\)")?;
    let mut called = BTreeSet::new();
    for file in sources(&workspace_root().join("adapters/cloudmap/src"))? {
        let text = std::fs::read_to_string(&file)?;
        for c in call.captures_iter(&text) {
            let pascal: String = c[1]
                .split('_')
                .map(|part| {
                    let mut chars = part.chars();
                    chars
                        .next()
                        .map(|f| f.to_ascii_uppercase().to_string() + chars.as_str())
                        .unwrap_or_default()
                })
                .collect();
            called.insert(format!("servicediscovery:{pascal}"));
        }
    }
    // The scan must see the adapter's calls, or the comparison below proves nothing.
    for known in [
        "servicediscovery:DiscoverInstances",
        "servicediscovery:ListNamespaces",
    ] {
        ensure!(called.contains(known), "the scan found {called:?}");
    }
    let policy: Value =
        serde_json::from_str(&read(&format!("{DEPLOY}/iam-controller-policy.json"))?)?;
    let mut allowed = BTreeSet::new();
    for statement in policy["Statement"].as_array().context("Statement")? {
        ensure!(statement["Effect"] == "Allow", "{statement}");
        allowed.extend(strings(&statement["Action"]));
    }
    ensure!(
        allowed == called,
        "iam-controller-policy.json allows {allowed:?}; the adapter calls {called:?}"
    );
    Ok(())
}
