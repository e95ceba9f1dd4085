//! UDP echo responder for edge-netd's link probes.
//!
//! Invariant: stateless — every datagram is sent back unchanged to its sender, so a
//! probe's RTT is the path's RTT plus one recv/send here. Nothing is allocated per
//! datagram.

use std::future::Future;
use tokio::net::UdpSocket;

/// Largest probe echoed; edge-netd's probes are 24 bytes, anything bigger is truncated.
const MAX_DATAGRAM: usize = 2048;

/// Echo each datagram received on `socket` back to its sender until `shutdown`
/// completes. Send errors (e.g. the sender's route vanished) are logged and ignored:
/// one vehicle's broken link must not stop the responder for the others.
pub async fn run_probe_echo(
    socket: UdpSocket,
    shutdown: impl Future<Output = ()>,
) -> std::io::Result<()> {
    let mut buf = [0u8; MAX_DATAGRAM];
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            _ = &mut shutdown => return Ok(()),
            r = socket.recv_from(&mut buf) => {
                let (n, peer) = match r {
                    Ok(x) => x,
                    // ICMP errors from earlier sends surface here on Linux; not fatal.
                    Err(e) => {
                        tracing::debug!(error = %e, "probe echo recv");
                        continue;
                    }
                };
                if let Err(e) = socket.send_to(&buf[..n], peer).await {
                    tracing::debug!(error = %e, %peer, "probe echo send");
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn echoes_datagrams_back_to_their_sender_until_shutdown() {
        let server = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let addr = server.local_addr().unwrap();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(run_probe_echo(server, async {
            let _ = rx.await;
        }));
        let client = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        for i in 0u8..5 {
            client.send_to(&[i; 24], addr).await.unwrap();
            let mut buf = [0u8; 64];
            let (n, from) = client.recv_from(&mut buf).await.unwrap();
            assert_eq!((n, from), (24, addr));
            assert_eq!(&buf[..n], &[i; 24]);
        }
        tx.send(()).unwrap();
        task.await.unwrap().unwrap();
    }
}
