//! Several processes behind nginx, on loopback: instances of `examples/http_session.rs`
//! routed by the configurations in `deploy/nginx/`, and `deploy/cluster.sh` itself.
//!
//! They show that per-session order holds across processes when the balancer routes
//! by the session, and is lost when it does not: with consistent hashing on
//! `x-session-id` one session's requests run one at a time, in arrival order, on one
//! instance; with round-robin they run on several instances at once and complete out of
//! order. Every response names its instance in `x-served-by`.
//!
//! # Requirements and skipping
//!
//! These tests need nginx 1.17.1 or later (`nginx` on `PATH`, or `/usr/sbin/nginx`),
//! and the `deploy/cluster.sh` test also needs curl. When one is missing they print
//! `skipped: nginx not installed` (or `skipped: curl not installed`) and pass, so that
//! `cargo test` passes on a fresh machine. When the `CI` environment variable is set
//! (CI runs with `CI=true`), a missing program fails them instead: CI cannot pass
//! without running them.
//!
//! # How they run
//!
//! The instances are the example's binary, built by `cargo build --example
//! http_session` in this test's own profile and target directory. Each instance binds
//! port 0 and prints the address it got; nginx's listener takes a port that was free a
//! moment before, and the start is retried if another process took it meanwhile. nginx
//! runs without root from a fresh prefix directory under cargo's `target/tmp` (its
//! config, logs and temporary files; kept when a test fails). Every process is a child
//! held by a guard that kills it by id when dropped, also when a test panics. Requests
//! are few (under a hundred per test) and every wait has a timeout.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::Duration;

use http_body_util::{BodyExt, Empty};
use hyper::Request;
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio::time::{Instant, sleep, timeout};

#[path = "support/programs.rs"]
mod programs;
use programs::{Process, RunDir, free_port, require};

/// A program the cluster tests need; see [`require`].
fn require_program(name: &str, extra: &[&str]) -> Option<PathBuf> {
    require(name, extra, name, "the cluster tests (tests/cluster.rs)")
}

/// The work of one session's burst, in ms, in send order: the first request is the
/// slowest, so that if two of them ever run at once the later ones finish first.
const WORK_MS: [u64; 4] = [450, 300, 200, 150];
/// Time between two sends of a burst: what makes "arrival order" well defined. It is far
/// larger than the time a request takes through nginx to an instance on loopback.
const GAP: Duration = Duration::from_millis(75);
/// Upper bound on any single request, and on each start-up wait.
const WAIT: Duration = Duration::from_secs(10);
const INSTANCES: usize = 3;

// ---- finding nginx, curl and the example ----

/// Debian and Ubuntu install nginx in `/usr/sbin`, which is not on every `PATH`.
fn nginx() -> Option<PathBuf> {
    require_program("nginx", &["/usr/sbin/nginx", "/usr/local/sbin/nginx"])
}

/// The `http_session` example's binary, built once per test run.
///
/// This test's executable is `<target>/<profile>/deps/cluster-<hash>`; cargo puts
/// examples in `<target>/<profile>/examples/`. Building it here (a no-op when
/// `cargo test` already built the examples) keeps `cargo test --test cluster` working.
fn example_binary() -> &'static Path {
    static BINARY: OnceLock<PathBuf> = OnceLock::new();
    BINARY.get_or_init(|| {
        let exe = std::env::current_exe().expect("the test's own path");
        let profile_dir = exe
            .parent()
            .and_then(Path::parent)
            .expect("the test runs from <target>/<profile>/deps");
        let target_dir = profile_dir.parent().expect("a target directory");
        let profile = match profile_dir.file_name().and_then(|name| name.to_str()) {
            Some("debug") => "dev",
            Some(name) => name,
            None => panic!("no profile in {}", profile_dir.display()),
        };
        let status = Command::new(env!("CARGO"))
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .args(["build", "--quiet", "--example", "http_session", "--profile"])
            .arg(profile)
            .arg("--target-dir")
            .arg(target_dir)
            .status()
            .expect("run cargo build");
        assert!(
            status.success(),
            "cargo build --example http_session failed"
        );
        let binary = profile_dir.join("examples").join("http_session");
        assert!(binary.is_file(), "no {}", binary.display());
        binary
    })
}

fn deploy_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy")
}

/// One `http_session` process.
struct Instance {
    addr: String,
    process: Process,
}

/// Starts `count` instances, each on a port of its own choosing, and waits until each
/// has printed `listening on ADDR`.
async fn start_instances(dir: &RunDir, count: usize) -> Vec<Instance> {
    let mut instances = Vec::new();
    for i in 0..count {
        let log_path = dir.0.join(format!("instance-{i}.log"));
        let log = std::fs::File::create(&log_path).expect("create the instance log");
        let child = Command::new(example_binary())
            .args(["--addr", "127.0.0.1:0"])
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("clone the log handle"))
            .stderr(log)
            .spawn()
            .expect("start http_session");
        let mut process = Process(child);
        let deadline = Instant::now() + WAIT;
        let addr = loop {
            let output = std::fs::read_to_string(&log_path).unwrap_or_default();
            if let Some(addr) = output
                .lines()
                .find_map(|line| line.strip_prefix("listening on "))
            {
                break addr.trim().to_owned();
            }
            assert!(
                !process.has_exited() && Instant::now() < deadline,
                "instance {i} did not start:\n{output}"
            );
            sleep(Duration::from_millis(20)).await;
        };
        instances.push(Instance { addr, process });
    }
    instances
}

/// nginx in front of some instances, with one routing file from `deploy/nginx/`.
struct Front {
    addr: SocketAddr,
    // Declared before `prefix`: nginx stops before its directory goes.
    _process: Process,
    _prefix: RunDir,
}

async fn start_front(nginx: &Path, routing: &str, instances: &[Instance], name: &str) -> Front {
    let prefix = RunDir::new(&format!("cluster-{name}"));
    let servers: String = instances
        .iter()
        .map(|instance| format!("server {};\n", instance.addr))
        .collect();
    let nginx_dir = deploy_dir().join("nginx");
    std::fs::copy(nginx_dir.join("nginx.conf"), prefix.0.join("nginx.conf")).unwrap();
    std::fs::copy(nginx_dir.join(routing), prefix.0.join("routing.conf")).unwrap();
    std::fs::write(prefix.0.join("servers.conf"), servers).unwrap();

    for _attempt in 0..5 {
        let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        std::fs::write(prefix.0.join("listen.conf"), format!("listen {addr};\n")).unwrap();
        let stderr = std::fs::File::create(prefix.0.join("stderr.log")).unwrap();
        let child = Command::new(nginx)
            .arg("-p")
            .arg(&prefix.0)
            .arg("-c")
            .arg(prefix.0.join("nginx.conf"))
            // In the foreground, and one process: its id is all there is to stop.
            .args(["-g", "daemon off; master_process off;"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .expect("start nginx");
        let mut process = Process(child);
        let deadline = Instant::now() + WAIT;
        loop {
            if process.has_exited() {
                let log =
                    |file: &str| std::fs::read_to_string(prefix.0.join(file)).unwrap_or_default();
                let errors = format!("{}{}", log("stderr.log"), log("error.log"));
                if errors.contains("Address already in use") {
                    break; // another process took the port: try another
                }
                panic!("nginx did not start:\n{errors}");
            }
            // Ready once a request through it reaches one of the instances.
            if try_post(addr, "/work?ms=0&tag=ready", &[])
                .await
                .is_ok_and(|reply| {
                    reply.status == 200 && addrs(instances).contains(reply.served_by.as_str())
                })
            {
                return Front {
                    addr,
                    _process: process,
                    _prefix: prefix,
                };
            }
            assert!(
                Instant::now() < deadline,
                "nginx did not answer in {WAIT:?}"
            );
            sleep(Duration::from_millis(20)).await;
        }
    }
    panic!("nginx found no free port in 5 attempts");
}

// ---- requests ----

#[derive(Debug, Clone)]
struct Reply {
    status: u16,
    served_by: String,
    body: String,
    done: Instant,
}

/// `POST target` on a connection of its own (so that requests never queue behind each
/// other in the client), with `headers`.
async fn try_post(
    addr: SocketAddr,
    target: &str,
    headers: &[(&str, String)],
) -> Result<Reply, Box<dyn std::error::Error + Send + Sync>> {
    let exchange = async {
        let stream = TcpStream::connect(addr).await?;
        let (mut sender, connection) =
            hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
        tokio::spawn(connection);
        let mut request = Request::post(target).header("host", addr.to_string());
        for (name, value) in headers {
            request = request.header(*name, value);
        }
        let response = sender
            .send_request(request.body(Empty::<Bytes>::new())?)
            .await?;
        let status = response.status().as_u16();
        let served_by = match response.headers().get("x-served-by") {
            Some(value) => value.to_str()?.to_owned(),
            None => String::new(),
        };
        let body = response.into_body().collect().await?.to_bytes();
        Ok(Reply {
            status,
            served_by,
            body: String::from_utf8(body.to_vec())?,
            done: Instant::now(),
        })
    };
    timeout(WAIT, exchange).await?
}

async fn post(addr: SocketAddr, target: &str, headers: &[(&str, String)]) -> Reply {
    match try_post(addr, target, headers).await {
        Ok(reply) => reply,
        Err(error) => panic!("POST {target} via {addr}: {error}"),
    }
}

/// Which instance serves each session, asked with one quick request per session, all
/// at once.
async fn instance_of(front: SocketAddr, sessions: &[String]) -> BTreeMap<String, String> {
    let mut tasks = Vec::new();
    for session in sessions {
        let headers = [("x-session-id", session.clone())];
        let session = session.clone();
        tasks.push(tokio::spawn(async move {
            let reply = post(front, &format!("/work?ms=0&tag={session}"), &headers).await;
            assert_eq!((reply.status, reply.body.as_str()), (200, session.as_str()));
            (session, reply.served_by)
        }));
    }
    let mut map = BTreeMap::new();
    for task in tasks {
        let (session, instance) = task.await.unwrap();
        map.insert(session, instance);
    }
    map
}

/// One session's requests, sent `GAP` apart with the work of `WORK_MS`.
struct Burst {
    label: String,
    start: Instant,
    /// In send order.
    replies: Vec<Reply>,
}

async fn burst(front: SocketAddr, label: &str, headers: Vec<(&'static str, String)>) -> Burst {
    let start = Instant::now();
    let mut tasks = Vec::new();
    for (i, ms) in WORK_MS.into_iter().enumerate() {
        let headers = headers.clone();
        let target = format!("/work?ms={ms}&tag={label}-{i}");
        let send_at = start + GAP * u32::try_from(i).unwrap();
        tasks.push(tokio::spawn(async move {
            tokio::time::sleep_until(send_at).await;
            post(front, &target, &headers).await
        }));
    }
    let mut replies = Vec::new();
    for task in tasks {
        replies.push(task.await.unwrap());
    }
    Burst {
        label: label.to_owned(),
        start,
        replies,
    }
}

impl Burst {
    /// Send positions, in the order the responses completed.
    fn completion_order(&self) -> Vec<usize> {
        let mut order: Vec<usize> = (0..self.replies.len()).collect();
        order.sort_by_key(|&i| self.replies[i].done);
        order
    }

    fn instances(&self) -> BTreeSet<&str> {
        self.replies.iter().map(|r| r.served_by.as_str()).collect()
    }

    fn elapsed(&self) -> Duration {
        self.replies.iter().map(|r| r.done).max().unwrap() - self.start
    }

    /// What happened, for assertion messages.
    fn describe(&self) -> String {
        let mut text = format!("burst {}:\n", self.label);
        for (i, reply) in self.replies.iter().enumerate() {
            text += &format!(
                "  sent at {:>3} ms, work {:>3} ms, done at {:>4} ms: {} {:?} from {}\n",
                GAP.as_millis() * i as u128,
                WORK_MS[i],
                (reply.done - self.start).as_millis(),
                reply.status,
                reply.body,
                reply.served_by,
            );
        }
        text
    }

    fn assert_answered(&self) {
        for (i, reply) in self.replies.iter().enumerate() {
            let tag = format!("{}-{i}", self.label);
            assert_eq!(
                (reply.status, reply.body.as_str()),
                (200, tag.as_str()),
                "{}",
                self.describe()
            );
        }
    }

    /// One instance ran them one at a time, in send order.
    fn assert_ordered(&self) {
        self.assert_answered();
        let send_order: Vec<usize> = (0..self.replies.len()).collect();
        assert_eq!(self.completion_order(), send_order, "{}", self.describe());
        assert_eq!(self.instances().len(), 1, "{}", self.describe());
        // One at a time: the whole burst took at least the sum of its work (overlapping
        // requests would take about the longest one), and not much more.
        let work = Duration::from_millis(WORK_MS.iter().sum());
        let elapsed = self.elapsed();
        assert!(
            elapsed >= work && elapsed < work + Duration::from_secs(1),
            "took {elapsed:?} for {work:?} of work\n{}",
            self.describe()
        );
    }
}

fn session(name: &str) -> Vec<(&'static str, String)> {
    vec![("x-session-id", name.to_owned())]
}

fn addrs(instances: &[Instance]) -> BTreeSet<&str> {
    instances.iter().map(|i| i.addr.as_str()).collect()
}

// ---- the tests ----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hashed_by_session_each_session_runs_in_order_on_one_instance() {
    let Some(nginx) = nginx() else { return };
    let dir = RunDir::new("cluster-ordered");
    let instances = start_instances(&dir, INSTANCES).await;
    let front = start_front(&nginx, "by-header.conf", &instances, "ordered-nginx").await;

    // Three sessions at once: each is ordered on its own, none waits for the others.
    let (alice, bob, carol) = tokio::join!(
        burst(front.addr, "alice", session("alice")),
        burst(front.addr, "bob", session("bob")),
        burst(front.addr, "carol", session("carol")),
    );
    for burst in [&alice, &bob, &carol] {
        burst.assert_ordered();
        assert!(addrs(&instances).contains(burst.instances().first().unwrap()));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_spread_over_all_instances_and_requests_without_one_go_round_robin() {
    let Some(nginx) = nginx() else { return };
    let dir = RunDir::new("cluster-spread");
    let instances = start_instances(&dir, INSTANCES).await;
    let front = start_front(&nginx, "by-header.conf", &instances, "spread-nginx").await;

    let sessions: Vec<String> = (0..30).map(|i| format!("user-{i}")).collect();
    let first = instance_of(front.addr, &sessions).await;
    let again = instance_of(front.addr, &sessions).await;
    assert_eq!(first, again, "a session keeps its instance");
    let used: BTreeSet<&str> = first.values().map(String::as_str).collect();
    assert_eq!(
        used,
        addrs(&instances),
        "30 sessions over {INSTANCES} instances"
    );

    // No header, an empty hash key: nginx (1.17.1 and later) falls back to round-robin,
    // so one after the other they take turns.
    let mut served = BTreeMap::<String, usize>::new();
    for i in 0..2 * INSTANCES {
        let reply = post(front.addr, &format!("/work?ms=0&tag=anon-{i}"), &[]).await;
        assert_eq!(reply.status, 200);
        *served.entry(reply.served_by).or_default() += 1;
    }
    let each_twice: BTreeMap<String, usize> = instances
        .iter()
        .map(|instance| (instance.addr.clone(), 2))
        .collect();
    assert_eq!(served, each_twice);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn round_robin_runs_a_session_on_several_instances_and_breaks_its_order() {
    let Some(nginx) = nginx() else { return };
    let dir = RunDir::new("cluster-round-robin");
    let instances = start_instances(&dir, INSTANCES).await;
    let front = start_front(&nginx, "round-robin.conf", &instances, "round-robin-nginx").await;

    let alice = burst(front.addr, "alice", session("alice")).await;
    alice.assert_answered();
    // Each instance orders only the requests it got; together they overlap, and the
    // quick later requests overtake the slow first one.
    assert!(alice.instances().len() > 1, "{}", alice.describe());
    let send_order: Vec<usize> = (0..WORK_MS.len()).collect();
    assert_ne!(alice.completion_order(), send_order, "{}", alice.describe());
    let work = Duration::from_millis(WORK_MS.iter().sum());
    assert!(alice.elapsed() < work, "{}", alice.describe());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_instance_moves_only_its_sessions_which_stay_ordered() {
    let Some(nginx) = nginx() else { return };
    let dir = RunDir::new("cluster-stop");
    let mut instances = start_instances(&dir, INSTANCES).await;
    let front = start_front(&nginx, "by-header.conf", &instances, "stop-nginx").await;

    let sessions: Vec<String> = (0..30).map(|i| format!("user-{i}")).collect();
    let before = instance_of(front.addr, &sessions).await;
    let victim = before["user-0"].clone();

    // Stop the instance by its process id, as a crash or a deploy would.
    let position = instances.iter().position(|i| i.addr == victim).unwrap();
    instances[position].process.stop();

    // nginx finds it refusing connections, skips it and uses the next instance on the
    // hash ring for its sessions; every other session stays where it was.
    let after = instance_of(front.addr, &sessions).await;
    let mut moved = Vec::new();
    for session in &sessions {
        if before[session] == victim {
            assert_ne!(
                after[session], victim,
                "{session} still on the stopped instance"
            );
            moved.push(session.clone());
        } else {
            assert_eq!(
                after[session], before[session],
                "{session} moved needlessly"
            );
        }
    }

    // After the move, each moved session is ordered again, on its new instance.
    let bursts = futures::future::join_all(
        moved
            .iter()
            .take(3)
            .map(|session_id| burst(front.addr, session_id, session(session_id))),
    )
    .await;
    for burst in &bursts {
        burst.assert_ordered();
        assert_eq!(
            *burst.instances().first().unwrap(),
            after[&burst.label],
            "{}",
            burst.describe()
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_by_cookie_or_client_address_are_ordered_too() {
    let Some(nginx) = nginx() else { return };
    let dir = RunDir::new("cluster-variants");
    let instances = start_instances(&dir, INSTANCES).await;
    let by_cookie = start_front(&nginx, "by-cookie.conf", &instances, "cookie-nginx").await;
    let by_address = start_front(&nginx, "by-address.conf", &instances, "address-nginx").await;

    // nginx routes by the cookie and passes it on as `x-session-id`; by the address,
    // every request from 127.0.0.1 is one session, whatever header the client sends.
    let (cookie, address) = tokio::join!(
        burst(
            by_cookie.addr,
            "cookie",
            vec![("cookie", "session_id=c1; theme=dark".to_owned())]
        ),
        burst(by_address.addr, "address", session("chosen-by-the-client")),
    );
    cookie.assert_ordered();
    address.assert_ordered();
}

// ---- deploy/cluster.sh ----

/// Sends `signal` to the process `pid` with the shell's `kill`; true if it was delivered
/// (with signal `0`: if the process exists).
fn kill(signal: &str, pid: &str) -> bool {
    Command::new("sh")
        .args(["-c", "kill -s \"$1\" \"$2\" 2>/dev/null", "sh", signal, pid])
        .status()
        .is_ok_and(|status| status.success())
}

/// The running script. Dropped, it gets SIGTERM, so that its trap stops what it started
/// (SIGKILL would leave its children running), and SIGKILL only if it outlives `WAIT`.
struct Script(Process);

impl Script {
    fn terminate(&mut self) {
        if !self.0.has_exited() {
            kill("TERM", &self.0.0.id().to_string());
        }
        let deadline = std::time::Instant::now() + WAIT;
        while !self.0.has_exited() && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Script {
    fn drop(&mut self) {
        self.terminate();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_sh_answers_on_its_address_and_stops_everything_it_started() {
    if nginx().is_none() || require_program("curl", &[]).is_none() {
        return;
    }
    let binary = example_binary();
    for _attempt in 0..5 {
        let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let mut script = Script(Process(
            Command::new("bash")
                .arg(deploy_dir().join("cluster.sh"))
                .args(["--instances", "2", "--addr", &addr.to_string(), "--bin"])
                .arg(binary)
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .expect("start deploy/cluster.sh"),
        ));
        let stdout = script.0.0.stdout.take().unwrap();
        let mut stderr = script.0.0.stderr.take().unwrap();
        // The script's output, line by line, until it prints its address or exits.
        let (lines, ready) = tokio::task::spawn_blocking(move || {
            use std::io::BufRead;
            let mut lines = Vec::new();
            for line in std::io::BufReader::new(stdout).lines() {
                let line = line.unwrap();
                lines.push(line.clone());
                if line.starts_with("cluster listening on ") {
                    return (lines, true);
                }
            }
            (lines, false)
        })
        .await
        .unwrap();
        if !ready {
            let mut errors = String::new();
            std::io::Read::read_to_string(&mut stderr, &mut errors).unwrap();
            if errors.contains("Address already in use") {
                continue; // another process took the port: try another
            }
            panic!("cluster.sh did not start:\n{}\n{errors}", lines.join("\n"));
        }
        assert_eq!(
            lines.last().unwrap(),
            &format!("cluster listening on {addr}")
        );

        // `instance ADDR pid PID` and `nginx pid PID, ...`: what it started.
        let instances: Vec<(&str, &str)> = lines
            .iter()
            .filter_map(|line| line.strip_prefix("instance "))
            .map(|rest| rest.split_once(" pid ").unwrap())
            .collect();
        assert_eq!(instances.len(), 2, "{lines:#?}");
        let nginx_pid = lines
            .iter()
            .find_map(|line| line.strip_prefix("nginx pid "))
            .and_then(|rest| rest.split(',').next())
            .unwrap();
        let mut pids: Vec<&str> = instances.iter().map(|&(_, pid)| pid).collect();
        pids.push(nginx_pid);
        assert!(pids.iter().all(|pid| kill("0", pid)), "{lines:#?}");

        let reply = post(addr, "/work?ms=0&tag=hello", &session("alice")).await;
        assert_eq!((reply.status, reply.body.as_str()), (200, "hello"));
        assert!(
            instances.iter().any(|&(a, _)| a == reply.served_by),
            "{reply:?}"
        );

        // SIGTERM, as `kill PID` sends: the script stops what it started, then exits.
        script.terminate();
        assert!(
            script.0.has_exited(),
            "cluster.sh still running after {WAIT:?}"
        );
        for pid in pids {
            assert!(!kill("0", pid), "process {pid} outlived cluster.sh");
        }
        assert!(try_post(addr, "/work?ms=0&tag=gone", &[]).await.is_err());
        return;
    }
    panic!("cluster.sh found no free port in 5 attempts");
}
