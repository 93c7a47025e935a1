//! A round-robin TCP balancer on loopback, placing connections as a Kubernetes ClusterIP Service (kube-proxy) or
//! any L4 balancer does: each new connection goes to the next backend and stays there for its whole life, so
//! calls on it never move. Backends can be added while it runs (a scale-out).

use std::net::SocketAddr;
use std::sync::Arc;

use parking_lot::Mutex;
use tokio::net::{TcpListener, TcpStream};
use tokio::task::{JoinHandle, JoinSet};

/// The balancer; dropping it closes its listener and every connection it carries.
pub struct Balancer {
    /// Where clients connect.
    pub addr: SocketAddr,
    backends: Arc<Mutex<Vec<SocketAddr>>>,
    task: JoinHandle<()>,
}

impl Balancer {
    /// Listens on a free loopback port in front of `backends`.
    pub async fn start(backends: &[SocketAddr]) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let backends = Arc::new(Mutex::new(backends.to_vec()));
        let chosen = Arc::clone(&backends);
        let task = tokio::spawn(async move {
            // Owned by this task: aborting it drops every connection with it.
            let mut connections = JoinSet::new();
            let mut next = 0usize;
            loop {
                let Ok((client, _)) = listener.accept().await else {
                    continue;
                };
                let backend = {
                    let backends = chosen.lock();
                    let backend = backends[next % backends.len()];
                    next += 1;
                    backend
                };
                connections.spawn(relay(client, backend));
                // Finished relays are reaped so the set does not grow with the test.
                while connections.try_join_next().is_some() {}
            }
        });
        Self {
            addr,
            backends,
            task,
        }
    }

    /// Adds a backend: new connections alternate over it too; open ones stay where they are.
    pub fn add(&self, backend: SocketAddr) {
        self.backends.lock().push(backend);
    }
}

/// Copies bytes both ways between `client` and a new connection to `backend` until either side closes.
async fn relay(mut client: TcpStream, backend: SocketAddr) {
    let _ = client.set_nodelay(true);
    let Ok(mut upstream) = TcpStream::connect(backend).await else {
        return;
    };
    let _ = upstream.set_nodelay(true);
    let _ = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
}

impl Drop for Balancer {
    fn drop(&mut self) {
        self.task.abort();
    }
}
