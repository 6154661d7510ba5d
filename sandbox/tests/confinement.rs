//! Tries every forbidden thing in a confined child process (this binary, started again with
//! `SANDBOX_PROBE=<name>`), and checks it failed as designed: an errno (Landlock's EACCES) or
//! death by SIGSYS (seccomp's kill). Control probes check that what the policy allows still
//! works, so the test can fail both ways. Its own harness: a child must be single-threaded.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::process::ExitStatusExt;
use std::path::PathBuf;
use std::process::{Command, Stdio};

use sandbox::{Enforcement, FsAccess, FsRule, Policy, UserSwitch};

/// What a probe must end with.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Expect {
    /// The call returned an error (the probe prints `DENIED`).
    Denied,
    /// The kernel killed the process with SIGSYS.
    Killed,
    /// The call worked (control probes).
    Allowed,
}

const PROBES: &[(&str, Expect)] = &[
    ("read_model", Expect::Allowed),
    ("spawn_thread", Expect::Allowed),
    ("connect_peer", Expect::Allowed),
    ("exec", Expect::Killed),
    ("read_shadow", Expect::Denied),
    ("read_keys", Expect::Denied),
    ("list_sys", Expect::Denied),
    ("read_proc_self", Expect::Denied),
    ("write_model_dir", Expect::Denied),
    ("connect_other_port", Expect::Denied),
    ("bind_new_port", Expect::Killed),
    ("ptrace", Expect::Killed),
    ("mount", Expect::Killed),
    ("bpf", Expect::Killed),
    ("user_namespace", Expect::Killed),
    ("fork", Expect::Killed),
    ("executable_mapping", Expect::Killed),
    ("unix_socket", Expect::Killed),
    ("signal_parent", Expect::Killed),
    ("compute_thread_accept", Expect::Killed),
    // A model file opened before confinement: its read lease can be read (the load's
    // tripwire), but no lease can be taken or changed once confined.
    ("read_model_lease", Expect::Allowed),
    ("set_model_lease", Expect::Killed),
    // Enforcement modes: another thread makes `required` refuse and `best-effort` report
    // Landlock as partial; log-only lets a forbidden call through (and reports it).
    ("required_refuses_with_threads", Expect::Denied),
    ("best_effort_reports_partial", Expect::Allowed),
    ("log_only_does_not_kill", Expect::Allowed),
    // A supervisor's readiness socket (sd_notify) connected before confinement, abstract
    // name included, can still be written to (engine/src/notify.rs relies on it).
    ("notify_socket_connected_before", Expect::Allowed),
];

struct Env {
    model_dir: PathBuf,
    secret: PathBuf,
    peer_port: u16,
    other_port: u16,
}

fn env() -> Env {
    let get = |k: &str| std::env::var(k).unwrap();
    Env {
        model_dir: get("PROBE_MODEL_DIR").into(),
        secret: get("PROBE_SECRET").into(),
        peer_port: get("PROBE_PEER_PORT").parse().unwrap(),
        other_port: get("PROBE_OTHER_PORT").parse().unwrap(),
    }
}

fn outcome<T, E: std::fmt::Debug>(r: Result<T, E>) {
    match r {
        Ok(_) => println!("ALLOWED"),
        Err(e) => println!("DENIED {e:?}"),
    }
}

fn errno(ret: i64) -> Result<(), std::io::Error> {
    if ret < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(())
    }
}

fn run_probe(name: &str) {
    let e = env();
    let root = unsafe_free_geteuid() == 0;
    let policy = Policy {
        fs: vec![FsRule {
            path: e.model_dir.clone(),
            access: FsAccess::Read,
        }],
        bind_tcp: vec![],
        connect_tcp: vec![e.peer_port],
        user: root.then_some(UserSwitch {
            uid: 65534,
            gid: 65534,
        }),
        enforcement: Enforcement::Required,
        seccomp_log_only: false,
        gpu: false,
    };
    if let Some(mode) = name
        .strip_suffix("_with_threads")
        .or(name.strip_suffix("_reports_partial"))
    {
        let _other = std::thread::spawn(|| std::thread::sleep(std::time::Duration::from_secs(30)));
        let policy = Policy {
            enforcement: if mode == "required_refuses" {
                Enforcement::Required
            } else {
                Enforcement::BestEffort
            },
            ..policy
        };
        match sandbox::prepare(&policy).expect("prepare").apply() {
            Ok((status, _))
                if status.landlock == sandbox::LandlockStatus::Partial
                    && !status.fully_enforced() =>
            {
                println!("ALLOWED partial")
            }
            Ok((status, _)) => println!("UNEXPECTED {status:?}"),
            Err(e) => println!("DENIED {e}"),
        }
        return;
    }
    if name == "notify_socket_connected_before" {
        use std::os::linux::net::SocketAddrExt;
        use std::os::unix::net::{SocketAddr, UnixDatagram};
        let addr = SocketAddr::from_abstract_name(
            format!("bulwark-probe-notify-{}", std::process::id()).as_bytes(),
        )
        .unwrap();
        let supervisor = UnixDatagram::bind_addr(&addr).unwrap();
        let notifier = UnixDatagram::unbound().unwrap();
        notifier.connect_addr(&addr).unwrap();
        let (status, _) = sandbox::prepare(&policy)
            .expect("prepare")
            .apply()
            .expect("apply");
        assert!(status.fully_enforced(), "{status:?}");
        let mut buf = [0u8; 16];
        let sent = notifier.send(b"READY=1\n");
        let got = supervisor.recv(&mut buf).map(|n| buf[..n].to_vec());
        match (sent, got) {
            (Ok(_), Ok(m)) if m == b"READY=1\n" => println!("ALLOWED delivered"),
            (s, g) => println!("DENIED {s:?} {g:?}"),
        }
        return;
    }
    if name == "log_only_does_not_kill" {
        let policy = Policy {
            seccomp_log_only: true,
            ..policy
        };
        let (status, _) = sandbox::prepare(&policy)
            .expect("prepare")
            .apply()
            .expect("apply");
        assert_eq!(status.seccomp, sandbox::SeccompStatus::LogOnly);
        assert!(!status.fully_enforced());
        // Denied by the allowlist, but only logged: the call returns (EPERM, unprivileged).
        let _ = raw(libc::SYS_ptrace, [libc::PTRACE_TRACEME as i64, 0, 0, 0]);
        println!("ALLOWED survived");
        return;
    }
    // Opened before confinement, as the server opens its model files.
    let model = std::fs::File::open(e.model_dir.join("weights.bin")).unwrap();
    let model_fd = std::os::fd::AsRawFd::as_raw_fd(&model) as i64;
    let prepared = sandbox::prepare(&policy).expect("prepare");
    let (status, compute) = prepared.apply().expect("apply");
    assert!(status.fully_enforced(), "{status:?}");
    std::io::stdout().flush().unwrap();
    match name {
        "read_model" => outcome(std::fs::read(e.model_dir.join("weights.bin"))),
        "spawn_thread" => outcome(std::thread::spawn(|| 42).join()),
        "connect_peer" => outcome(TcpStream::connect(("127.0.0.1", e.peer_port))),
        "exec" => outcome(Command::new("/bin/true").status()),
        "read_shadow" => outcome(std::fs::read("/etc/shadow")),
        "read_keys" => outcome(std::fs::read(&e.secret)),
        "list_sys" => outcome(std::fs::read_dir("/sys/devices/system/cpu")),
        "read_proc_self" => outcome(std::fs::read("/proc/self/environ")),
        "write_model_dir" => outcome(std::fs::write(e.model_dir.join("planted"), b"x")),
        "connect_other_port" => outcome(TcpStream::connect(("127.0.0.1", e.other_port))),
        "bind_new_port" => outcome(TcpListener::bind("127.0.0.1:0")),
        "ptrace" => outcome(errno(raw(
            libc::SYS_ptrace,
            [libc::PTRACE_TRACEME as i64, 0, 0, 0],
        ))),
        "mount" => outcome(errno(raw(libc::SYS_mount, [0, 0, 0, 0]))),
        "bpf" => outcome(errno(raw(libc::SYS_bpf, [5, 0, 0, 0]))),
        "user_namespace" => outcome(errno(raw(
            libc::SYS_unshare,
            [libc::CLONE_NEWUSER as i64, 0, 0, 0],
        ))),
        "fork" => outcome(errno(raw(libc::SYS_clone, [libc::SIGCHLD as i64, 0, 0, 0]))),
        "executable_mapping" => outcome(errno(raw(
            libc::SYS_mmap,
            [
                0,
                4096,
                (libc::PROT_READ | libc::PROT_EXEC) as i64,
                (libc::MAP_PRIVATE | libc::MAP_ANONYMOUS) as i64,
            ],
        ))),
        "unix_socket" => outcome(errno(raw(
            libc::SYS_socket,
            [libc::AF_UNIX as i64, libc::SOCK_STREAM as i64, 0, 0],
        ))),
        "signal_parent" => outcome(errno(raw(
            libc::SYS_kill,
            [std::os::unix::process::parent_id() as i64, 0, 0, 0],
        ))),
        "compute_thread_accept" => {
            let t = std::thread::spawn(move || {
                compute.apply_to_current_thread().unwrap();
                TcpStream::connect(("127.0.0.1", e.peer_port)).map(|_| ())
            });
            outcome(t.join().unwrap());
        }
        "read_model_lease" => outcome(errno(raw(
            libc::SYS_fcntl,
            [model_fd, libc::F_GETLEASE as i64, 0, 0],
        ))),
        "set_model_lease" => outcome(errno(raw(
            libc::SYS_fcntl,
            [model_fd, libc::F_SETLEASE as i64, libc::F_UNLCK as i64, 0],
        ))),
        other => panic!("unknown probe {other}"),
    }
}

/// A raw system call with up to four arguments (the forbidden ones have no safe wrapper).
fn raw(nr: i64, a: [i64; 4]) -> i64 {
    // SAFETY: every probe passes null or integer arguments; the calls either fail, are killed by
    // seccomp, or (unconfined) act only on this short-lived child process.
    unsafe { libc::syscall(nr, a[0], a[1], a[2], a[3]) }
}

fn unsafe_free_geteuid() -> u32 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines().find(|l| l.starts_with("Uid:")).map(|l| {
                l.split_whitespace()
                    .nth(2)
                    .unwrap_or("1")
                    .parse()
                    .unwrap_or(1)
            })
        })
        .unwrap_or(1)
}

fn main() {
    if let Ok(probe) = std::env::var("SANDBOX_PROBE") {
        run_probe(&probe);
        return;
    }
    let dir = std::env::temp_dir().join(format!("sandbox-probe-{}", std::process::id()));
    let model_dir = dir.join("model");
    std::fs::create_dir_all(&model_dir).unwrap();
    std::fs::write(model_dir.join("weights.bin"), b"weights").unwrap();
    let secret = dir.join("keys");
    std::fs::write(&secret, b"alice sha256:00").unwrap();
    // The child may switch to nobody: let it traverse to the model directory.
    for p in [&dir, &model_dir] {
        std::fs::set_permissions(p, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    }
    std::fs::set_permissions(
        model_dir.join("weights.bin"),
        std::os::unix::fs::PermissionsExt::from_mode(0o644),
    )
    .unwrap();
    std::fs::set_permissions(&secret, std::os::unix::fs::PermissionsExt::from_mode(0o644)).unwrap();
    let peer = TcpListener::bind("127.0.0.1:0").unwrap();
    let other = TcpListener::bind("127.0.0.1:0").unwrap();
    let me = std::env::current_exe().unwrap();
    let filter: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with('-'))
        .collect();
    let mut failures = Vec::new();
    let mut ran = 0;
    for (name, expect) in PROBES {
        if !filter.is_empty() && !filter.iter().any(|f| name.contains(f.as_str())) {
            continue;
        }
        ran += 1;
        let mut child = Command::new(&me)
            .env("SANDBOX_PROBE", name)
            .env("PROBE_MODEL_DIR", &model_dir)
            .env("PROBE_SECRET", &secret)
            .env(
                "PROBE_PEER_PORT",
                peer.local_addr().unwrap().port().to_string(),
            )
            .env(
                "PROBE_OTHER_PORT",
                other.local_addr().unwrap().port().to_string(),
            )
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut out = String::new();
        child
            .stdout
            .take()
            .unwrap()
            .read_to_string(&mut out)
            .unwrap();
        let mut err = String::new();
        child
            .stderr
            .take()
            .unwrap()
            .read_to_string(&mut err)
            .unwrap();
        let status = child.wait().unwrap();
        let got = if status.signal() == Some(libc::SIGSYS) {
            // A kill must say what it killed: the SIGSYS reporter names the call first. Except
            // inside posix_spawn (the exec probe), which blocks every signal around its clone:
            // a trap while SIGSYS is blocked is a plain kill, with nothing to report it.
            if *name != "exec"
                && (!err.contains("bulwark: seccomp: system call ") || err.contains("(unknown)"))
            {
                failures.push(format!("{name}: killed without naming the call: {err:?}"));
            }
            Expect::Killed
        } else if out.contains("ALLOWED") {
            Expect::Allowed
        } else if out.contains("DENIED") {
            Expect::Denied
        } else {
            failures.push(format!("{name}: unexpected end {status:?}\n{out}{err}"));
            continue;
        };
        let detail = out.lines().last().unwrap_or("").to_owned();
        if got == *expect {
            println!("probe {name:<24} {got:?} ok {detail}");
        } else {
            failures.push(format!(
                "{name}: expected {expect:?}, got {got:?} ({status:?}) {out}{err}"
            ));
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
    if failures.is_empty() {
        println!("confinement: {ran} probes passed");
    } else {
        for f in &failures {
            eprintln!("FAILED {f}");
        }
        std::process::exit(1);
    }
}
