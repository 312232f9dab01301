//! The .deb: built with cargo-deb from the binary under test, then its file
//! list and control fields checked with dpkg-deb, as an operator would.

use std::process::Command;

fn available(program: &str, args: &[&str]) -> bool {
    Command::new(program)
        .args(args)
        .output()
        .is_ok_and(|o| o.status.success())
}

#[test]
fn the_deb_installs_the_binary_units_and_conffile() {
    if !crate::support::require(
        available("cargo", &["deb", "--version"]),
        "cargo-deb",
        "cargo install cargo-deb --locked",
    ) || !crate::support::require(
        available("dpkg-deb", &["--version"]),
        "dpkg-deb",
        "apt-get install dpkg",
    ) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let deb = dir.path().join("indexedcp.deb");
    // --no-build with the dev profile packages the binary this test run built
    // (a release build would double the suite's time); --fast: light compression.
    let output = Command::new("cargo")
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .args([
            "deb",
            "--no-build",
            "--profile",
            "dev",
            "--no-strip",
            "--fast",
            "-o",
        ])
        .arg(&deb)
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "cargo deb failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );

    let listing = Command::new("dpkg-deb")
        .arg("-c")
        .arg(&deb)
        .output()
        .unwrap();
    let listing = String::from_utf8_lossy(&listing.stdout);
    for path in [
        "./usr/bin/indexedcp",
        "./usr/lib/systemd/system/indexedcp.service",
        "./usr/lib/systemd/system/indexedcp-receiver.service",
        "./etc/indexedcp/indexedcp.toml",
        "./usr/share/doc/indexedcp/copyright",
        "./usr/share/doc/indexedcp/examples/receiver.toml",
    ] {
        assert!(
            listing.lines().any(|l| l.ends_with(path)),
            "{path} missing from the package:\n{listing}"
        );
    }
    let field = |name: &str| {
        let out = Command::new("dpkg-deb")
            .arg("-f")
            .arg(&deb)
            .arg(name)
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    };
    assert_eq!(field("Package"), "indexedcp");
    assert!(field("Depends").contains("procps"), "{}", field("Depends"));
    let control = dir.path().join("control");
    let status = Command::new("dpkg-deb")
        .arg("-e")
        .arg(&deb)
        .arg(&control)
        .status()
        .unwrap();
    assert!(status.success());
    let conffiles = std::fs::read_to_string(control.join("conffiles")).unwrap();
    assert_eq!(conffiles.trim(), "/etc/indexedcp/indexedcp.toml");
    let postinst = std::fs::read_to_string(control.join("postinst")).unwrap();
    assert!(
        postinst.contains("indexedcp"),
        "postinst does not create the system user:\n{postinst}"
    );
}
