//! The CLI's answers to bad input: one line that says what to do.

use std::process::Command;

use crate::testkit::shoal;

fn run(args: &[&str]) -> (bool, String) {
    let out = Command::new(shoal()).args(args).output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn bad_input_gets_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("missing");
    let missing = missing.to_str().unwrap();

    let (ok, err) = run(&[
        "daemon",
        "--data",
        missing,
        "--mount",
        "/tmp/unused-shoal-mnt",
    ]);
    assert!(!ok);
    assert!(
        err.contains("is not a shoal data directory: run `shoal init --data"),
        "{err}"
    );

    let (ok, err) = run(&["status", "--data", missing]);
    assert!(!ok);
    assert!(err.contains("no shoal daemon is running"), "{err}");

    let (ok, err) = run(&["init", "--data", missing, "--block-size", "1KiB"]);
    assert!(!ok);
    assert!(err.contains("use a size from 64KiB to 64MiB"), "{err}");

    let (ok, err) = run(&["init", "--data", missing, "--block-size", "lots"]);
    assert!(!ok);
    assert!(err.contains("invalid value 'lots'"), "{err}");

    let (ok, err) = run(&["daemon", "--frobnicate"]);
    assert!(!ok);
    assert!(err.contains("unexpected argument '--frobnicate'"), "{err}");

    let (ok, _) = run(&["init", "--data", missing]);
    assert!(ok);
    let (ok, err) = run(&["init", "--data", missing]);
    assert!(!ok);
    assert!(err.contains("is already initialized for cluster"), "{err}");

    let (ok, err) = run(&[
        "local",
        "up",
        "--nodes",
        "0",
        "--dir",
        dir.path().to_str().unwrap(),
    ]);
    assert!(!ok);
    assert!(err.contains("--nodes must be from 1 to 64"), "{err}");

    let (ok, err) = run(&[
        "join",
        "--data",
        missing,
        "--token",
        "x",
        "--peer",
        "127.0.0.1:1",
        "--listen",
        "127.0.0.1:0",
    ]);
    assert!(!ok);
    assert!(err.contains("a join token looks like"), "{err}");

    let (ok, err) = run(&["status", "--data", missing, "--watch", "0"]);
    assert!(!ok);
    assert!(err.contains("is not a refresh interval"), "{err}");

    let (ok, err) = run(&["daemon", "--data", missing, "--metrics", "localhost"]);
    assert!(!ok);
    assert!(
        err.contains("invalid value 'localhost' for '--metrics <ADDR>'"),
        "{err}"
    );

    // An address this host does not have: the daemon says so before it starts anything.
    let (ok, err) = run(&[
        "daemon",
        "--data",
        missing,
        "--mount",
        dir.path().join("mnt").to_str().unwrap(),
        "--no-plugin",
        "--metrics",
        "192.0.2.1:9477",
    ]);
    assert!(!ok);
    assert!(
        err.contains("--metrics 192.0.2.1:9477: cannot listen there"),
        "{err}"
    );

    let (ok, err) = run(&["token", "show", "--data", missing]);
    assert!(!ok);
    assert!(
        err.contains("only the node that ran `shoal init --listen` has the join token"),
        "{err}"
    );
}

#[test]
fn every_command_has_help() {
    for cmd in [
        &["--help"][..],
        &["init", "--help"],
        &["daemon", "--help"],
        &["status", "--help"],
        &["local", "up", "--help"],
    ] {
        let out = Command::new(shoal()).args(cmd).output().unwrap();
        assert!(out.status.success(), "{cmd:?}");
        assert!(
            String::from_utf8_lossy(&out.stdout).contains("Usage: shoal"),
            "{cmd:?}"
        );
    }
}
