//! `EnrollmentService.Enroll` over the control plane's mutual-TLS port: the transport
//! the credential manager uses, behind [`Enroller`] so its decisions are tested
//! without a network.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use misaki_proto::fleet_v1 as pb;
use pb::enrollment_service_client::EnrollmentServiceClient;
use tokio::sync::watch;

use crate::channel::{self, ClientTls};
use crate::config::Config;
use crate::engine::EngineView;

/// One enrolment or renewal gets this long, connection included; then it is retried.
const ENROL_TIMEOUT: Duration = Duration::from_secs(30);

/// Sends a CSR and returns the issued certificate (PEM).
pub(crate) trait Enroller {
    /// Send `csr_pem` over a connection presenting `client`.
    fn enroll<'a>(
        &'a self,
        csr_pem: String,
        client: ClientTls<'a>,
    ) -> impl Future<Output = Result<String, String>> + Send + 'a;
}

/// The real one: a fresh connection per call (the identity it presents changes),
/// bound to the `default` class's uplink like the fleet stream.
#[derive(Debug, Clone)]
pub(crate) struct GrpcEnroller {
    pub config: Arc<Config>,
    pub views: watch::Receiver<Arc<EngineView>>,
    /// Which of `config.control_planes` the next call goes to: a failed call moves to
    /// the next one (round robin, from the first).
    pub turn: Arc<AtomicUsize>,
}

impl GrpcEnroller {
    pub(crate) fn new(config: Arc<Config>, views: watch::Receiver<Arc<EngineView>>) -> Self {
        let turn = Arc::default();
        GrpcEnroller {
            config,
            views,
            turn,
        }
    }

    fn address(&self) -> &http::Uri {
        let all = &self.config.control_planes;
        &all[self.turn.load(Ordering::Relaxed) % all.len()]
    }
}

impl Enroller for GrpcEnroller {
    fn enroll<'a>(
        &'a self,
        csr_pem: String,
        client: ClientTls<'a>,
    ) -> impl Future<Output = Result<String, String>> + Send + 'a {
        let call = async move {
            let mut views = self.views.clone();
            // After the first selection, so the connection can be bound to an uplink.
            let interface = match views.wait_for(|v| v.ready).await {
                Ok(v) => channel::default_interface(&self.config, &v),
                Err(_) => None,
            };
            let address = self.address();
            tracing::info!(control_plane = %address, "enrolment: connecting");
            let channel = channel::connect(address, interface.as_deref(), Some(client))
                .await
                .map_err(|e| format!("connect: {}", channel::error_chain(&e)))?;
            let reply = EnrollmentServiceClient::new(channel)
                .enroll(pb::EnrollRequest { csr_pem })
                .await
                .map_err(|s| format!("{:?}: {}", s.code(), s.message()))?;
            Ok(reply.into_inner().certificate_pem)
        };
        async move {
            let result = tokio::time::timeout(ENROL_TIMEOUT, call)
                .await
                .unwrap_or_else(|_| Err(format!("no answer within {ENROL_TIMEOUT:?}")));
            if result.is_err() && self.config.control_planes.len() > 1 {
                // The next attempt (after the manager's backoff) tries another replica.
                self.turn.fetch_add(1, Ordering::Relaxed);
            }
            result
        }
    }
}
