//! No multipart upload is left open behind the buffer's back: an upload
//! created for a file's key whose id was never recorded (the agent was
//! killed between CreateMultipartUpload's answer and the buffer's commit, or
//! the answer was lost) is aborted by the file's next attempt, so that the
//! bucket holds at most the one recorded upload, and none once the file is
//! delivered.

use std::time::Duration;

use object_store::multipart::MultipartStore;

use super::{agent_config, peers};
use crate::fixtures::{Daemon, drop_file};
use crate::support::{eventually, pseudo_random};

const PART: usize = 5 << 20;

#[tokio::test(flavor = "multi_thread")]
async fn an_unrecorded_multipart_upload_is_aborted_by_the_next_attempt() {
    for peer in peers().await {
        let case = format!("{:?}", peer.kind);
        if !peer.lists_uploads() {
            // The agent finds leftovers with ListMultipartUploads, which
            // s3s-fs does not have: there only a lifecycle rule removes them.
            eprintln!("{case}: skipped, the server does not list multipart uploads");
            continue;
        }
        // What a kill right after CreateMultipartUpload leaves: an upload at
        // the file's key that no buffer knows.
        let leftover = peer
            .client()
            .create_multipart(&"in/big.bin".into())
            .await
            .unwrap();
        assert_eq!(
            peer.open_uploads().await,
            [("in/big.bin".to_owned(), leftover.clone())],
            "{case}"
        );

        let dir = tempfile::tempdir().unwrap();
        let (spool, staging) = (dir.path().join("spool"), dir.path().join("staging"));
        std::fs::create_dir_all(&staging).unwrap();
        let config = agent_config(dir.path(), &spool, &peer.target(dir.path(), ""));
        // The agent dies after its first part is acknowledged, with its own
        // upload recorded and open.
        let mut daemon = Daemon::start_with_env(
            &config,
            &[(
                indexedcp::failpoint::ENV,
                indexedcp::failpoint::UPLOAD_AFTER_ACK,
            )],
        );
        let data = pseudo_random(2 * PART + 1, 14);
        drop_file(&staging, &spool, "big.bin", &data);
        eventually(
            Duration::from_secs(60),
            &format!("{case}: the agent to reach its failpoint"),
            async || daemon.child.try_wait().unwrap().map(|_| ()),
        )
        .await;
        let open = peer.open_uploads().await;
        assert_eq!(open.len(), 1, "{case}: {open:?}");
        assert_eq!(open[0].0, "in/big.bin", "{case}");
        assert_ne!(open[0].1, leftover, "{case}: the leftover is still open");

        // The next run resumes the recorded upload and completes it.
        let _daemon = Daemon::start(&config);
        eventually(
            Duration::from_secs(60),
            &format!("{case}: the object"),
            async || (peer.objects().await.get("in/big.bin") == Some(&data)).then_some(()),
        )
        .await;
        assert_eq!(peer.objects().await.len(), 1, "{case}");
        assert_eq!(peer.open_uploads().await, [], "{case}");
    }
}
