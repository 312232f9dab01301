//! Configuration errors: exit 78 and a message naming the key (and its line).

use crate::support::*;

fn run(args: &[&str], config: &std::path::Path) -> (Option<i32>, String, String) {
    let output = indexedcp()
        .args(args)
        .arg("--config")
        .arg(config)
        .output()
        .unwrap();
    (
        output.status.code(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

const TARGET: &str = "[[target]]\nname = \"central\"\nurl = \"http://127.0.0.1:9/upload\"\n";

#[test]
fn each_invalid_config_exits_78_naming_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let spool = |extra: &str| {
        format!("{TARGET}\n[[spool]]\npath = \"/tmp/icp-spool\"\ntarget = \"central\"\n{extra}\n")
    };
    let cases: Vec<(&str, String, &str)> = vec![
        ("unknown key", format!("{TARGET}colour = \"blue\"\n"), "colour"),
        ("wrong type", format!("[daemon]\ncheck_interval = true\n{TARGET}"), "check_interval"),
        ("unknown target", "[[target]]\nname = \"a\"\nurl = \"http://x/upload\"\n[[spool]]\npath = \"/tmp/s\"\ntarget = \"b\"\n".into(), "target"),
        ("nested spools", format!("{}[[spool]]\npath = \"/tmp/icp-spool/inner\"\ntarget = \"central\"\n", spool("")), "path"),
        ("move without move_to", spool("disposition = \"move\""), "move_to"),
        ("move_to inside the spool", spool("disposition = \"move\"\nmove_to = \"/tmp/icp-spool/sent\""), "move_to"),
        ("initial above max", format!("{TARGET}initial_retry_delay = \"2m\"\nmax_retry_delay = \"1m\"\n"), "initial_retry_delay"),
        ("multiplier below one", format!("{TARGET}retry_multiplier = 0.5\n"), "retry_multiplier"),
        ("zero chunk size", format!("{TARGET}chunk_size = 0\n"), "chunk_size"),
        ("unreadable key file", format!("{TARGET}api_key_file = \"/nonexistent/key\"\n"), "api_key_file"),
        ("bad duration", format!("[daemon]\ncheck_interval = \"soon\"\n{TARGET}"), "check_interval"),
        ("bad size", format!("{TARGET}chunk_size = \"huge\"\n"), "chunk_size"),
        ("nothing to do", "[daemon]\n".into(), "nothing to do"),
        ("bad path mode", "[server]\noutput_dir = \"/tmp/x\"\npath_mode = \"yolo\"\n".into(), "path_mode"),
    ];
    for (what, text, needle) in cases {
        let path = dir.path().join("bad.toml");
        std::fs::write(&path, &text).unwrap();
        for command in [&["check-config"][..], &["daemon"][..]] {
            let (code, _, stderr) = run(command, &path);
            assert_eq!(code, Some(78), "{what} ({command:?}): {stderr}");
            assert!(
                stderr.contains(needle),
                "{what} ({command:?}): {stderr:?} does not name {needle}"
            );
            assert!(
                stderr.contains("bad.toml"),
                "{what}: {stderr:?} does not name the file"
            );
        }
    }
    let (code, _, stderr) = run(&["daemon"], &dir.path().join("missing.toml"));
    assert_eq!(code, Some(78), "{stderr}");
    assert!(stderr.contains("missing.toml"), "{stderr}");
}

#[test]
fn check_config_prints_the_effective_config_with_keys_redacted() {
    for name in ["indexedcp.toml", "quickstart.toml"] {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("config")
            .join(name);
        let (code, stdout, stderr) = run(&["check-config"], &path);
        assert_eq!(code, Some(0), "{name}: {stderr}");
        assert!(
            stdout.contains("[daemon]") && stdout.contains("check_interval"),
            "{name}: {stdout}"
        );
        assert!(
            !stdout.contains("quickstart-key"),
            "{name}: a key was printed"
        );
    }
}
