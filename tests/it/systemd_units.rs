//! The systemd units in `systemd/` as an operator gets them: `systemd-analyze
//! verify` has nothing to say about them, and `systemd-analyze security` rates
//! their sandbox "OK" (overall exposure 2.0 or less). Also checks that the
//! receiver config the package ships as an example is valid.
//!
//! Without `systemd-analyze` the unit tests print why they were skipped and
//! pass on a developer's machine; under `CI=true` they fail instead, and
//! `.ci/run` installs it, so CI always runs them.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use crate::fixtures::*;
use crate::support::*;

const UNITS: [&str; 2] = ["indexedcp.service", "indexedcp-receiver.service"];

/// "OK" in `systemd-analyze security`'s scale; the README quotes the measured value.
const MAX_EXPOSURE: f64 = 2.0;

/// What every unit's `ExecStart=` runs in production.
const INSTALLED_BIN: &str = "/usr/bin/indexedcp";

fn unit_path(unit: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("systemd")
        .join(unit)
}

/// `systemd-analyze` with `args`, or `None` (after saying so) when it is not
/// installed. The message goes straight to stderr, past the test harness's
/// output capture, so that a skipped check is visible in a normal run.
fn systemd_analyze(args: &[&std::ffi::OsStr]) -> Option<Output> {
    match Command::new("systemd-analyze").args(args).output() {
        Ok(output) => Some(output),
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => {
            crate::support::require(false, "systemd-analyze", "apt-get install systemd");
            None
        }
        Err(error) => panic!("cannot run systemd-analyze: {error}"),
    }
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// What the daemon relies on, and what the issue asks of every unit, checked
/// without systemd-analyze so that it also holds where that is missing.
#[test]
fn units_keep_the_directives_the_daemon_relies_on() {
    let required = [
        // READY=1 / STOPPING=1 come from the main process itself.
        "Type=notify",
        "NotifyAccess=main",
        // SIGHUP re-reads the config.
        "ExecReload=/bin/kill -HUP $MAINPID",
        "Restart=on-failure",
        "User=indexedcp",
        "Group=indexedcp",
        "StateDirectory=indexedcp",
        "ConfigurationDirectory=indexedcp",
        "ProtectSystem=strict",
        "ProtectHome=yes",
        "PrivateTmp=yes",
        "NoNewPrivileges=yes",
        "CapabilityBoundingSet=",
        "SystemCallFilter=@system-service",
        "RestrictAddressFamilies=AF_INET AF_INET6 AF_UNIX",
    ];
    for unit in UNITS {
        let shipped = std::fs::read_to_string(unit_path(unit)).unwrap();
        let lines: Vec<&str> = shipped.lines().map(str::trim).collect();
        for directive in required {
            assert!(
                lines.iter().any(|line| line.starts_with(directive)),
                "{unit} lacks `{directive}`"
            );
        }
        // systemd must not SIGKILL the daemon before its own shutdown grace
        // (default 10 s) has run out.
        let timeout_stop = lines
            .iter()
            .find_map(|line| line.strip_prefix("TimeoutStopSec="))
            .unwrap_or_else(|| panic!("{unit} lacks TimeoutStopSec="));
        let seconds: u64 = timeout_stop
            .strip_suffix('s')
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("{unit}: TimeoutStopSec={timeout_stop} is not `<N>s`"));
        assert!(
            seconds > 10,
            "{unit}: TimeoutStopSec={timeout_stop} leaves no margin above the 10 s grace"
        );
    }
}

/// `systemd-analyze verify` exits 0 even for unknown keys and unparsable
/// values (it only prints a warning and ignores the line), so any output at
/// all is a failure.
///
/// verify also checks that `ExecStart=`'s program exists and is executable.
/// `/usr/bin/indexedcp` exists only where the package is installed, so the
/// unit is verified as a copy (same file name, so the same unit name) whose
/// `ExecStart=` runs the binary this test suite built; every other line is
/// verified as shipped. `User=indexedcp` needs no such change: verify does not
/// look up the user, which may not exist on a build machine.
#[test]
fn units_pass_systemd_analyze_verify_without_any_message() {
    let dir = tempfile::tempdir().unwrap();
    for unit in UNITS {
        let shipped = std::fs::read_to_string(unit_path(unit)).unwrap();
        let exec_start = format!("ExecStart={INSTALLED_BIN} daemon --config /etc/indexedcp/");
        assert_eq!(
            shipped.matches(&exec_start).count(),
            1,
            "{unit} must start the daemon exactly once with `{exec_start}...`"
        );
        let local = shipped.replace(
            &format!("ExecStart={INSTALLED_BIN} "),
            &format!("ExecStart={BIN} "),
        );
        let copy = dir.path().join(unit);
        std::fs::write(&copy, local).unwrap();

        let Some(output) = systemd_analyze(&["verify".as_ref(), copy.as_os_str()]) else {
            return;
        };
        let (stdout, stderr) = (text(&output.stdout), text(&output.stderr));
        assert!(
            output.status.success() && stdout.is_empty() && stderr.is_empty(),
            "systemd-analyze verify {unit}: {}\nstdout:\n{stdout}\nstderr:\n{stderr}",
            output.status
        );
    }
}

/// The number in "Overall exposure level for UNIT: 1.1 OK" (the line may
/// start with an arrow and end with an emoji, depending on the terminal).
fn overall_exposure(report: &str, unit: &str) -> Option<f64> {
    let prefix = format!("Overall exposure level for {unit}:");
    let line = report.lines().find(|line| line.contains(&prefix))?;
    let after = &line[line.find(&prefix)? + prefix.len()..];
    after.split_whitespace().next()?.parse().ok()
}

#[test]
fn units_have_an_ok_exposure_score() {
    for unit in UNITS {
        let path = unit_path(unit);
        let Some(output) = systemd_analyze(&[
            "security".as_ref(),
            "--offline=yes".as_ref(),
            path.as_os_str(),
        ]) else {
            return;
        };
        let (stdout, stderr) = (text(&output.stdout), text(&output.stderr));
        assert!(
            output.status.success(),
            "systemd-analyze security {unit}: {}\n{stdout}\n{stderr}",
            output.status
        );
        let exposure = overall_exposure(&stdout, unit).unwrap_or_else(|| {
            panic!("no \"Overall exposure level for {unit}\" line in:\n{stdout}\n{stderr}")
        });
        assert!(
            exposure <= MAX_EXPOSURE,
            "{unit}: exposure {exposure} is above {MAX_EXPOSURE:.1}; the directives to add are \
             the ones marked with a cross:\n{stdout}"
        );
    }
}

#[test]
fn overall_exposure_reads_the_summary_line() {
    let report = "  NAME  DESCRIPTION  EXPOSURE\n\
                  \u{2717} PrivateNetwork=  Service has access to the host's network  0.5\n\n\
                  \u{2192} Overall exposure level for indexedcp.service: 1.1 OK \u{1f642}\n";
    assert_eq!(overall_exposure(report, "indexedcp.service"), Some(1.1));
    assert_eq!(overall_exposure(report, "indexedcp-receiver.service"), None);
    assert_eq!(
        overall_exposure(
            "Overall exposure level for x.service: 9.6 UNSAFE\n",
            "x.service"
        ),
        Some(9.6)
    );
}

/// The package installs `packaging/receiver.toml` as the example config of
/// `indexedcp-receiver.service`; an operator copies it to /etc/indexedcp with
/// a `server.keys` beside it. It must be valid as shipped.
#[test]
fn packaged_receiver_example_config_is_valid() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("receiver.toml");
    std::fs::copy(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("packaging/receiver.toml"),
        &config,
    )
    .unwrap();
    std::fs::write(dir.path().join("server.keys"), format!("{KEY}\n")).unwrap();

    let output = indexedcp()
        .arg("check-config")
        .arg("--config")
        .arg(&config)
        .output()
        .unwrap();
    let (stdout, stderr) = (text(&output.stdout), text(&output.stderr));
    assert_eq!(
        output.status.code(),
        Some(0),
        "check-config packaging/receiver.toml:\n{stdout}\n{stderr}"
    );
    // A receiver-only host: the agent role stays off.
    assert!(stdout.contains("[server]"), "{stdout}");
    assert!(!stdout.contains("[[spool]]"), "{stdout}");
    assert!(!stdout.contains("[[target]]"), "{stdout}");
}

/// `cargo deb` is too slow for the test suite (a release build), so this
/// checks what it would trip over: `[package.metadata.deb]` names files that
/// exist, both units, and maintainer scripts that are executable, parse as
/// POSIX sh and carry the `#DEBHELPER#` token cargo-deb replaces with the
/// units' enable/restart/stop code.
#[test]
fn deb_metadata_names_files_that_exist() {
    use std::os::unix::fs::PermissionsExt;

    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let manifest: toml::Table = std::fs::read_to_string(root.join("Cargo.toml"))
        .unwrap()
        .parse()
        .unwrap();
    let deb = manifest["package"]["metadata"]["deb"]
        .as_table()
        .expect("[package.metadata.deb] in Cargo.toml");

    let mut destinations = Vec::new();
    for asset in deb["assets"].as_array().unwrap() {
        let asset = asset.as_array().unwrap();
        let (source, dest) = (asset[0].as_str().unwrap(), asset[1].as_str().unwrap());
        // cargo-deb builds target/release/ itself.
        if !source.starts_with("target/release/") {
            assert!(root.join(source).is_file(), "asset {source} does not exist");
        }
        destinations.push(dest);
    }
    for dest in ["usr/bin/", "etc/indexedcp/indexedcp.toml"] {
        assert!(destinations.contains(&dest), "no asset installed to {dest}");
    }

    for entry in deb["systemd-units"].as_array().unwrap() {
        let unit = entry["unit-name"].as_str().unwrap();
        let dir = entry["unit-scripts"].as_str().unwrap();
        assert!(
            root.join(dir).join(format!("{unit}.service")).is_file(),
            "systemd-units names {unit}, but {dir}{unit}.service does not exist"
        );
        assert!(
            UNITS.contains(&format!("{unit}.service").as_str()),
            "{unit} is packaged but not checked by this module's tests"
        );
    }
    assert_eq!(deb["systemd-units"].as_array().unwrap().len(), UNITS.len());

    let scripts = root.join(deb["maintainer-scripts"].as_str().unwrap());
    for name in ["postinst", "postrm"] {
        let path = scripts.join(name);
        let body = std::fs::read_to_string(&path).unwrap();
        assert!(body.starts_with("#!/bin/sh\n"), "{name}: not a sh script");
        assert!(
            body.contains("\n#DEBHELPER#\n"),
            "{name}: lacks #DEBHELPER#"
        );
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o111, 0o111, "{name} is not executable");
        let syntax = Command::new("sh").arg("-n").arg(&path).output().unwrap();
        assert!(syntax.status.success(), "{name}: {}", text(&syntax.stderr));
    }
}
