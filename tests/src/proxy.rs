//! A TCP relay on loopback that stands for the network between a hospital
//! and the coordinator: it forwards each connection to an upstream address
//! set once the upstream is known, and can cut every relayed connection at
//! once, as a firewall or a flaky link would.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

pub struct Relay {
    pub addr: SocketAddr,
    upstream: watch::Sender<Option<SocketAddr>>,
    open: Arc<Mutex<Vec<tokio::task::JoinHandle<()>>>>,
    accepted: Arc<Mutex<usize>>,
    accept: tokio::task::JoinHandle<()>,
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.accept.abort();
        self.cut();
    }
}

impl Relay {
    /// Listens on loopback; connections before [`Relay::forward_to`] are
    /// closed at once (the far end is not there yet).
    pub async fn start() -> Relay {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (upstream, watching) = watch::channel(None::<SocketAddr>);
        let open: Arc<Mutex<Vec<tokio::task::JoinHandle<()>>>> = Arc::default();
        let accepted: Arc<Mutex<usize>> = Arc::default();
        let accept = tokio::spawn({
            let open = open.clone();
            let accepted = accepted.clone();
            async move {
                loop {
                    let Ok((mut inbound, _)) = listener.accept().await else {
                        continue;
                    };
                    let Some(target) = *watching.borrow() else {
                        drop(inbound);
                        continue;
                    };
                    *accepted.lock().unwrap() += 1;
                    let relay = tokio::spawn(async move {
                        if let Ok(mut outbound) = TcpStream::connect(target).await {
                            let _ =
                                tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                        }
                    });
                    open.lock().unwrap().push(relay);
                }
            }
        });
        Relay {
            addr,
            upstream,
            open,
            accepted,
            accept,
        }
    }

    pub fn forward_to(&self, upstream: SocketAddr) {
        self.upstream.send_replace(Some(upstream));
    }

    /// Drops every relayed connection, both ways.
    pub fn cut(&self) {
        for relay in self.open.lock().unwrap().drain(..) {
            relay.abort();
        }
    }

    /// Connections relayed so far.
    pub fn accepted(&self) -> usize {
        *self.accepted.lock().unwrap()
    }
}
