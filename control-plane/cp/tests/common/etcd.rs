//! The real etcd of the shared-mode tests (misaki-harness starts it) and a client of
//! its own API.

pub use misaki_harness::Etcd;

/// A client of the etcd API itself.
pub async fn client(etcd: &Etcd) -> etcd_client::Client {
    etcd_client::Client::connect([format!("http://{}", etcd.client)], None)
        .await
        .unwrap()
}
