//! What a user checks after dropping files into a spool whose target is a
//! bucket: every file is one object with the same bytes and our SHA-256
//! metadata, whatever its size; an object already there is recognised or
//! handled as `on_conflict` says.

use std::collections::BTreeMap;
use std::time::Duration;

use object_store::{Attribute, Attributes, ObjectStore, ObjectStoreExt, PutOptions};

use super::{Kind, agent_config, peers};
use crate::fixtures::{Daemon, drop_file, sha256_hex, status_json};
use crate::support::{eventually, pseudo_random};

const PART: usize = 5 << 20;

#[tokio::test(flavor = "multi_thread")]
async fn files_of_every_size_arrive_once_byte_identical() {
    for peer in peers().await {
        let dir = tempfile::tempdir().unwrap();
        let (spool, staging) = (dir.path().join("spool"), dir.path().join("staging"));
        std::fs::create_dir_all(&staging).unwrap();
        let config = agent_config(dir.path(), &spool, &peer.target(dir.path(), ""));
        let _daemon = Daemon::start(&config);
        let mut expected = BTreeMap::new();
        for (name, len) in [
            ("small.txt", 1000),
            ("empty", 0),
            ("sub/exact.bin", PART),
            ("large.bin", 2 * PART + 1),
        ] {
            let data = pseudo_random(len, len as u64);
            drop_file(&staging, &spool, name, &data);
            expected.insert(format!("in/{name}"), data);
        }
        let what = format!("{:?}: every file in the bucket", peer.kind);
        eventually(Duration::from_secs(60), &what, async || {
            (peer.objects().await == expected).then_some(())
        })
        .await;
        for (key, data) in &expected {
            assert_eq!(
                peer.sha256_metadata(key).await.as_deref(),
                Some(sha256_hex(data).as_str()),
                "{:?}: {key}",
                peer.kind
            );
        }
        if peer.kind == Kind::S3sFs {
            // s3s-fs keeps objects as plain files: the bytes are there.
            let root = peer.root.as_ref().unwrap().join(super::BUCKET);
            for (key, data) in &expected {
                assert_eq!(&std::fs::read(root.join(key)).unwrap(), data, "{key}");
            }
        }
        eventually(
            Duration::from_secs(10),
            "the buffer to be confirmed",
            async || {
                status_json(&config)
                    .iter()
                    .all(|f| f["state"] == "confirmed")
                    .then_some(())
            },
        )
        .await;
    }
}

/// Empties the peer's bucket; a client for it, and a temporary folder with
/// the paths of a spool and of a staging folder (created) for the agent.
async fn fresh_bucket(
    peer: &super::Peer,
) -> (
    std::sync::Arc<object_store::aws::AmazonS3>,
    tempfile::TempDir,
    std::path::PathBuf,
    std::path::PathBuf,
) {
    let client = peer.client();
    for key in peer.objects().await.keys() {
        client.delete(&key.as_str().into()).await.unwrap();
    }
    let dir = tempfile::tempdir().unwrap();
    let (spool, staging) = (dir.path().join("spool"), dir.path().join("staging"));
    std::fs::create_dir_all(&staging).unwrap();
    (client, dir, spool, staging)
}

/// An object already holding the file (our earlier attempt whose reply was
/// lost) counts as delivered; one with other bytes is renamed around, refused
/// or replaced as `on_conflict` says.
#[tokio::test(flavor = "multi_thread")]
async fn existing_objects_are_recognised_or_handled_by_on_conflict() {
    for peer in peers().await {
        for (on_conflict, len) in [
            ("rename", 1000),
            ("fail", 1000),
            ("overwrite", 1000),
            ("rename", 2 * PART + 1),
            ("fail", 2 * PART + 1),
            ("overwrite", 2 * PART + 1),
        ] {
            let case = format!("{:?}, on_conflict = {on_conflict}, {len} bytes", peer.kind);
            let (client, dir, spool, staging) = fresh_bucket(&peer).await;
            let ours = pseudo_random(len, 1);
            let theirs = b"someone else's bytes".to_vec();
            // Our own bytes, as a lost reply would leave them, with our metadata.
            let mut attributes = Attributes::new();
            attributes.insert(
                Attribute::Metadata("sha256".into()),
                sha256_hex(&ours).into(),
            );
            client
                .put_opts(
                    &"in/mine.dat".into(),
                    ours.clone().into(),
                    PutOptions::from(attributes),
                )
                .await
                .unwrap();
            client
                .put(&"in/other.dat".into(), theirs.clone().into())
                .await
                .unwrap();
            let target = peer.target(dir.path(), &format!("on_conflict = \"{on_conflict}\"\n"));
            let config = agent_config(dir.path(), &spool, &target);
            let _daemon = Daemon::start(&config);
            drop_file(&staging, &spool, "mine.dat", &ours);
            drop_file(&staging, &spool, "other.dat", &ours);

            let settled = eventually(Duration::from_secs(60), &case, async || {
                let files = status_json(&config);
                let done = files.len() == 2
                    && files
                        .iter()
                        .all(|f| f["state"] == "confirmed" || f["state"] == "failed");
                done.then_some(files)
            })
            .await;
            let objects = peer.objects().await;
            assert_eq!(objects["in/mine.dat"], ours, "{case}: not a second object");
            let state_of = |name: &str| {
                settled
                    .iter()
                    .find(|f| f["rel_path"] == name)
                    .map(|f| f["state"].as_str().unwrap_or_default().to_owned())
                    .unwrap()
            };
            assert_eq!(state_of("mine.dat"), "confirmed", "{case}");
            match on_conflict {
                "rename" => {
                    assert_eq!(objects.len(), 3, "{case}: {:?}", objects.keys());
                    assert_eq!(objects["in/other.dat"], theirs, "{case}");
                    let renamed: Vec<_> = objects
                        .iter()
                        .filter(|(k, _)| k.starts_with("in/other_") && k.ends_with(".dat"))
                        .collect();
                    assert_eq!(renamed.len(), 1, "{case}: {:?}", objects.keys());
                    assert_eq!(renamed[0].1, &ours, "{case}");
                    assert_eq!(state_of("other.dat"), "confirmed", "{case}");
                }
                "fail" => {
                    assert_eq!(objects.len(), 2, "{case}: {:?}", objects.keys());
                    assert_eq!(objects["in/other.dat"], theirs, "{case}");
                    assert_eq!(state_of("other.dat"), "failed", "{case}");
                    let reason = settled
                        .iter()
                        .find(|f| f["rel_path"] == "other.dat")
                        .map(|f| f["failure"].to_string())
                        .unwrap();
                    assert!(reason.contains("on_conflict"), "{case}: {reason}");
                }
                _ => {
                    assert_eq!(objects.len(), 2, "{case}: {:?}", objects.keys());
                    assert_eq!(objects["in/other.dat"], ours, "{case}");
                    assert_eq!(state_of("other.dat"), "confirmed", "{case}");
                }
            }
        }
    }
}

/// The file's own bytes at its key without our metadata (a write of ours
/// whose metadata the store lost when the agent was killed in between, as
/// s3s-fs can): the object is written again with the metadata and counts as
/// delivered, not copied a second time under a renamed key.
#[tokio::test(flavor = "multi_thread")]
async fn our_bytes_without_our_metadata_are_completed_in_place() {
    for peer in peers().await {
        let case = format!("{:?}", peer.kind);
        let (client, dir, spool, staging) = fresh_bucket(&peer).await;
        let ours = pseudo_random(1000, 7);
        client
            .put(&"in/bare.dat".into(), ours.clone().into())
            .await
            .unwrap();
        let target = peer.target(dir.path(), "on_conflict = \"rename\"\n");
        let config = agent_config(dir.path(), &spool, &target);
        let _daemon = Daemon::start(&config);
        drop_file(&staging, &spool, "bare.dat", &ours);
        eventually(Duration::from_secs(60), &case, async || {
            let files = status_json(&config);
            (files.len() == 1 && files[0]["state"] == "confirmed").then_some(())
        })
        .await;
        let objects = peer.objects().await;
        assert_eq!(objects.len(), 1, "{case}: {:?}", objects.keys());
        assert_eq!(objects["in/bare.dat"], ours, "{case}");
        let head = client.head(&"in/bare.dat".into()).await.unwrap();
        assert_eq!(head.size, 1000, "{case}");
        let got = client
            .get_opts(
                &"in/bare.dat".into(),
                object_store::GetOptions {
                    head: true,
                    ..Default::default()
                },
            )
            .await
            .unwrap();
        assert_eq!(
            got.attributes
                .get(&Attribute::Metadata("sha256".into()))
                .map(|v| v.to_string()),
            Some(sha256_hex(&ours)),
            "{case}: the metadata was written"
        );
    }
}
