//! The Consul hosts guide (`docs/guides/consul.md`) followed as written, on loopback: its marked
//! blocks make the CA, the tokens and the policy directory with `openssl` and the shell; the
//! Consul double plays the agents (or a real local agent, `TRELLIS_TEST_CONSUL_ADDR`); the
//! controller and the three proxies run the commands their systemd units would run, with
//! `deploy/consul/`'s env files; web is registered with the agent API from `services/web.json`.
//! The files change only where a test must: `/etc/trellis` is a temporary directory,
//! `/usr/local/bin` the workspace build, and every host's addresses are free ports on 127.0.0.1
//! (the same port everywhere a file names it).

use std::net::{Ipv4Addr, SocketAddr};
use std::path::Path;

use anyhow::{Context as _, ensure};
use trellis_guides::hosts::Hosts;
use trellis_guides::process::{Process, bin_dir, binary};
use trellis_guides::systemd::{Unit, command_line, environment_file, specifiers};
use trellis_guides::{guide, http, read, relocate, var, workspace_root};

const GUIDE: &str = "docs/guides/consul.md";
const DEPLOY: &str = "deploy/consul";
/// The workloads of the example, each on its own host.
const WORKLOADS: [&str; 3] = ["web", "client", "batch"];

/// Starts what `trellis-proxy@<instance>.service` starts: the env file the guide copies to
/// `/etc/trellis/proxy/<instance>.env` (addresses moved), the token as a credential.
async fn start_proxy(
    instance: &str,
    hosts: &mut Hosts,
    etc: &Path,
    scratch: &Path,
) -> anyhow::Result<Process> {
    let unit = Unit::parse(&read(&format!("{DEPLOY}/systemd/trellis-proxy@.service"))?)?;
    let credentials = scratch.join(format!("credentials-{instance}"));
    std::fs::create_dir_all(&credentials)?;
    let creds = credentials.display().to_string();
    // The guide: cp deploy/consul/proxy/<instance>.env /etc/trellis/proxy/<instance>.env
    let written = read(&format!("{DEPLOY}/proxy/{instance}.env"))?;
    std::fs::create_dir_all(etc.join("proxy"))?;
    std::fs::write(
        etc.join(format!("proxy/{instance}.env")),
        hosts.rewrite(instance, &written)?,
    )?;
    let env_path = relocate(
        &specifiers(unit.service("EnvironmentFile")?, instance, &creds)?,
        etc,
    )?;
    let env = environment_file(&std::fs::read_to_string(&env_path).context(env_path)?)?;
    // LoadCredential=NAME:PATH: systemd copies PATH into the credentials directory as NAME.
    let credential = specifiers(unit.service("LoadCredential")?, instance, &creds)?;
    let (name, source) = credential
        .split_once(':')
        .context("LoadCredential=NAME:PATH")?;
    std::fs::copy(relocate(source, etc)?, credentials.join(name))?;
    let words = command_line(
        &specifiers(unit.service("ExecStart")?, instance, &creds)?,
        &env,
    )?;
    let words = words
        .iter()
        .map(|w| relocate(w, etc))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let mut proxy = Process::spawn(
        &format!("proxy-{instance}"),
        Path::new(&words[0]),
        &words[1..],
        &env,
        scratch,
        &scratch.join("logs"),
    )?;
    proxy.wait_for("trellis-proxy started").await?;
    Ok(proxy)
}

/// `services/web.json` as the web host registers it: its ports moved with the web host's.
fn web_definition(hosts: &mut Hosts) -> anyhow::Result<String> {
    let mut definition: serde_json::Value =
        serde_json::from_str(&read(&format!("{DEPLOY}/services/web.json"))?)?;
    let port = definition["Port"].as_u64().context("Port")? as u16;
    definition["Port"] = hosts.at("web", port).port().into();
    let rewritten = hosts.rewrite("web", &definition.to_string())?;
    Ok(rewritten)
}

/// Which Consul the guide's hosts talk to.
enum Consul {
    /// The double, started by the test: every host's agent, web's node at 127.0.0.1.
    Double,
    /// A real local agent (`consul agent -dev`), already running at this address.
    Agent(SocketAddr),
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_consul_guide_gives_a_mesh_that_allows_client_and_denies_batch() -> anyhow::Result<()> {
    follow_the_guide(Consul::Double).await
}

/// The same against a real agent named by `TRELLIS_TEST_CONSUL_ADDR` (`http://127.0.0.1:8500`;
/// a local one: its checks call the proxies on 127.0.0.1, and its node address is where callers
/// connect). Its web-1 registration is removed before and after.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_consul_guide_works_against_a_real_agent() -> anyhow::Result<()> {
    let Ok(url) = std::env::var("TRELLIS_TEST_CONSUL_ADDR") else {
        println!(
            "skipped: TRELLIS_TEST_CONSUL_ADDR is not set (no real Consul agent to test against)"
        );
        return Ok(());
    };
    if std::env::var_os("TRELLIS_TEST_CONSUL_TOKEN").is_some() {
        println!(
            "skipped: TRELLIS_TEST_CONSUL_TOKEN is set, and `trellis controller --platform consul=` cannot be given an ACL token yet"
        );
        return Ok(());
    }
    let addr: SocketAddr = url
        .trim_start_matches("http://")
        .trim_end_matches('/')
        .parse()
        .with_context(|| format!("TRELLIS_TEST_CONSUL_ADDR {url:?}: expected http://IP:PORT"))?;
    let deregister = async || {
        http::request(
            addr,
            "PUT",
            "/v1/agent/service/deregister/web-1",
            "127.0.0.1",
            "",
        )
        .await
    };
    deregister().await?;
    let result = follow_the_guide(Consul::Agent(addr)).await;
    deregister().await?;
    result
}

async fn follow_the_guide(consul_kind: Consul) -> anyhow::Result<()> {
    guide::require_tool("openssl", "the guide makes the CA and the tokens with it")?;
    let bin = bin_dir()?;
    let double = binary("trellis-consul-double", "trellis-consul-double")?;
    let echo = binary("trellis-echo", "trellis-echo")?;
    let trellis = binary("trellis", "trellis-cli")?;
    binary("trellis-proxy", "trellis-proxy")?;
    let scratch = tempfile::tempdir()?;
    let scratch = scratch.path();
    let etc = scratch.join("etc-trellis");
    std::fs::create_dir_all(scratch.join("logs"))?;

    // Steps 1-3: the CA, the tokens and the policy, as the guide's blocks say.
    for name in ["ca", "tokens", "policy"] {
        guide::run(&guide::block(GUIDE, name)?, &etc, &workspace_root(), &bin)?;
    }
    let tokens = std::fs::read_to_string(etc.join("bootstrap-tokens.yaml"))?;
    for w in WORKLOADS {
        ensure!(
            tokens.contains(&format!("workload: default/{w}")),
            "{tokens}"
        );
    }

    // The hosts: the controller's address as controller.env gives it is the controller host.
    let mut hosts = Hosts::new();
    let controller_env_text = read(&format!("{DEPLOY}/controller.env"))?;
    let written = environment_file(&controller_env_text)?;
    let grpc: SocketAddr = var(&written, "TRELLIS_GRPC")?.parse()?;
    hosts.name(&grpc.ip().to_string(), "controller");
    let consul: SocketAddr = var(&written, "TRELLIS_CONSUL")?.parse()?;

    // Consul: one double plays every host's agent (web registers on its node, at web's address),
    // or a real local agent does.
    let (agent, _consul_process) = match consul_kind {
        Consul::Double => {
            let agent = hosts.at("controller", consul.port());
            let mut process = Process::spawn(
                "consul",
                &double,
                &[
                    "--listen".into(),
                    agent.to_string(),
                    "--node-name".into(),
                    "web-host".into(),
                    "--node-address".into(),
                    Ipv4Addr::LOCALHOST.to_string(),
                ],
                &[],
                scratch,
                &scratch.join("logs"),
            )?;
            process.wait_for("listening on").await?;
            (agent, Some(process))
        }
        Consul::Agent(addr) => {
            hosts.place("controller", consul.port(), addr);
            (addr, None)
        }
    };
    hosts.place("web", consul.port(), agent);

    // Step 4: the controller, as trellis-controller.service runs it.
    // The certificate's name is the controller host's address, moved with the host (a bare
    // address, which the ADDR:PORT rewrite does not see).
    let tls_name = var(&written, "TRELLIS_GRPC_TLS_NAME")?;
    ensure!(
        tls_name == grpc.ip().to_string(),
        "the guide's TLS name {tls_name} should be the controller's address {}",
        grpc.ip()
    );
    let moved = hosts.at("controller", grpc.port()).ip().to_string();
    std::fs::write(
        etc.join("controller.env"),
        hosts.rewrite("controller", &controller_env_text)?.replace(
            &format!("TRELLIS_GRPC_TLS_NAME={tls_name}"),
            &format!("TRELLIS_GRPC_TLS_NAME={moved}"),
        ),
    )?;
    let unit = Unit::parse(&read(&format!(
        "{DEPLOY}/systemd/trellis-controller.service"
    ))?)?;
    let env_path = relocate(unit.service("EnvironmentFile")?, &etc)?;
    let env = environment_file(&std::fs::read_to_string(&env_path)?)?;
    let words = command_line(&specifiers(unit.service("ExecStart")?, "", "")?, &env)?
        .iter()
        .map(|w| relocate(w, &etc))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let mut controller = Process::spawn(
        "controller",
        Path::new(&words[0]),
        &words[1..],
        &env,
        scratch,
        &scratch.join("logs"),
    )?;
    let admin_line = controller.wait_for("admin listening on").await?;
    let admin = admin_line
        .trim()
        .trim_start_matches("admin listening on ")
        .to_owned();

    // Step 5: web's app on loopback, its proxy, its registration with the agent.
    let app = hosts.at("web", 8080);
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
    for w in WORKLOADS {
        proxies.push(start_proxy(w, &mut hosts, &etc, scratch).await?);
    }
    let definition = web_definition(&mut hosts)?;
    let registered = http::request(
        hosts.at("web", consul.port()),
        "PUT",
        "/v1/agent/service/register",
        "127.0.0.1",
        &definition,
    )
    .await?;
    ensure!(registered.status == 200, "register: {registered:?}");

    // Step 6: client calls web through its HTTP proxy and its fixed port; batch is refused.
    let client_http = hosts.at("client", 15080);
    // The app saw client's two calls and nothing of batch's; web's proxy took them over mTLS.
    trellis_guides::ExampleMesh {
        client_http,
        client_port: hosts.at("client", 15081),
        url: "http://web.default/hello",
        refused: (hosts.at("batch", 15080), "batch -> web must be refused"),
        app,
        web_admin: hosts.at("web", 15000),
        min_handshakes: 2,
    }
    .check()
    .await?;
    let identity = http::get(hosts.at("client", 15000), "/identity")
        .await?
        .body;
    ensure!(
        identity.contains(r#""id":"spiffe://mesh.example/ns/default/sa/client""#)
            && identity.contains(r#""valid":true"#),
        "client's identity: {identity}"
    );

    // Step 7: trellis check sees the Consul platform, the policy, no problem.
    let check = std::process::Command::new(&trellis)
        .args(["check", "--admin", &admin])
        .output()?;
    let report = String::from_utf8_lossy(&check.stdout);
    ensure!(check.status.success(), "trellis check: {report}");
    ensure!(
        report.contains(&format!("platform consul:{agent}"))
            && report.contains("TrafficTarget default/client-to-web")
            && report.contains("problems: 0"),
        "{report}"
    );
    drop(proxies);
    Ok(())
}
