//! The hand-over between two agents on one node, as a DaemonSet with `maxSurge: 1` replaces
//! one with the other: pods see no refused connection, no 401 and no STS burst.
//!
//! The successor finds its predecessor through the state directory (`--state-dir`), at
//! `handover.sock`, which only root can reach (the directory is 0700), and both check the
//! other's uid. In order:
//!
//! 1. the successor says `hello` with its [`PROTOCOL`]; a predecessor speaking another one
//!    says `refused`, and the successor starts cold;
//! 2. the predecessor stops keeping the rules (the successor keeps them from now on, so the
//!    two never undo each other's work) and sends its listening sockets (`SCM_RIGHTS`: the
//!    same sockets, so no connection waiting in an accept queue is lost) and its cached
//!    credentials;
//! 3. the successor, once ready (its caches synced, the rules in place), or at once if the
//!    predecessor says it is `leaving` or goes away, accepts on the sockets and says `taken`;
//! 4. the predecessor stops accepting, stops refreshing, says `released`, and idles, serving
//!    the connections it has, until its own SIGTERM; it then exits keeping the rules;
//! 5. the successor listens at `handover.sock` for its own successor.
//!
//! A successor that goes away before `taken` hands the rules back. A kill -9 or a crash has
//! no hand-over: the successor finds no one listening and starts cold. Nothing that crosses
//! the socket is logged.

pub mod wire;

use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{UnixListener, UnixStream};
use tokio::sync::watch;

use crate::credentials::{CredentialCache, Issued};
use crate::http::Phase;
use crate::resolve::CredentialKey;
use crate::state::StateDir;
use wire::{Entry, Message, Offered, PROTOCOL, WireError};

/// The socket's name in the state directory.
pub const SOCKET: &str = "handover.sock";

/// How long each side waits for the other's next message while handing over.
const EXCHANGE_TIMEOUT: Duration = Duration::from_secs(10);

/// How far a hand-over has come, on the predecessor's side.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Progress {
    /// No successor is taking over.
    Serving,
    /// A successor has the sockets and the rules, and is getting ready.
    Handing,
    /// The successor accepts; this agent no longer does.
    HandedOver,
}

/// What a predecessor hands over, and the switches it steps back with.
pub struct Handing {
    /// Copies of the listening sockets, as the offer names them.
    pub listeners: Vec<(Offered, OwnedFd)>,
    pub credentials: Arc<CredentialCache>,
    /// Whether this agent keeps (checks and repairs) the rules.
    pub rules: watch::Sender<bool>,
    /// The servers' phase: [`Phase::Released`] once the successor accepts.
    pub phase: Arc<watch::Sender<Phase>>,
    /// How far the hand-over has come (read by the agent's stop).
    pub progress: watch::Sender<Progress>,
}

/// Listens for a successor at `handover.sock` in `dir` and hands it over `handing`. Returns
/// once one has taken over, or, with nothing handed over, when `leaving` turns true (the
/// agent stops). A successor that fails half-way is forgotten (the rules come back to this
/// agent) and the next one is waited for.
pub async fn serve(dir: StateDir, handing: Handing, mut leaving: watch::Receiver<bool>) {
    let path = dir.file(SOCKET);
    let _ = std::fs::remove_file(&path);
    // 0600 like every file in the directory; the peer's uid is checked on every connection too.
    let bound = UnixListener::bind(&path).and_then(|listener| {
        std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(crate::state::FILE_MODE))?;
        Ok(listener)
    });
    let listener = match bound {
        Ok(listener) => listener,
        Err(error) => {
            tracing::warn!(path = %path.display(), %error, "cannot listen for a successor: the next restart will start cold");
            return;
        }
    };
    tracing::debug!(path = %path.display(), "listening for a successor");
    loop {
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(error) => {
                    tracing::warn!(%error, "hand-over socket: accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            () = stopping(&mut leaving) => return,
        };
        match hand_over(stream, &handing, &mut leaving).await {
            Ok(()) => {
                tracing::info!("handed over to the successor: it answers every new connection; idle until stopped");
                // The successor listens at the path from now on.
                return;
            }
            Err(why) => {
                handing.rules.send_replace(true);
                handing.progress.send_replace(Progress::Serving);
                tracing::warn!(reason = %why, "hand-over to a successor failed: this agent keeps serving and keeping the rules");
            }
        }
    }
}

/// One successor, from its hello to `released`.
async fn hand_over(
    mut stream: UnixStream,
    handing: &Handing,
    leaving: &mut watch::Receiver<bool>,
) -> Result<(), String> {
    check_peer(&stream)?;
    let hello = tokio::time::timeout(EXCHANGE_TIMEOUT, wire::receive(&mut stream)).await;
    match hello.map_err(|_| "no hello in time".to_string())?.map_err(|e| e.to_string())? {
        Message::Hello { protocol: PROTOCOL, pid } => tracing::info!(successor_pid = pid, "a successor is taking over"),
        Message::Hello { protocol, .. } => {
            let reason = format!("the successor speaks hand-over protocol {protocol}, this agent {PROTOCOL}");
            let _ = wire::send(&mut stream, &Message::Refused { protocol: PROTOCOL, reason: reason.clone() }).await;
            return Err(reason);
        }
        other => return Err(format!("expected hello, got {}", name(&other))),
    }
    handing.rules.send_replace(false);
    handing.progress.send_replace(Progress::Handing);
    let offered: Vec<Offered> = handing.listeners.iter().map(|(offered, _)| offered.clone()).collect();
    let fds: Vec<_> = handing.listeners.iter().map(|(_, fd)| fd.as_fd().as_raw_fd()).collect();
    let offer = Message::Offer { protocol: PROTOCOL, listeners: offered };
    wire::send_with_fds(&mut stream, &offer, &fds).await.map_err(|e| e.to_string())?;
    let entries: Vec<Entry> =
        handing.credentials.handover_entries().iter().map(|(key, issued)| Entry::new(key, issued)).collect();
    let count = entries.len();
    wire::send(&mut stream, &Message::Credentials { entries }).await.map_err(|e| e.to_string())?;
    tracing::info!(listeners = fds.len(), credentials = count, "handed the listening sockets and cached credentials");
    // Until the successor accepts: if this agent is told to stop meanwhile, it says so, and
    // the successor accepts at once.
    let mut said_leaving = false;
    loop {
        tokio::select! {
            message = wire::receive(&mut stream) => match message.map_err(|e| e.to_string())? {
                Message::Taken => break,
                other => return Err(format!("expected taken, got {}", name(&other))),
            },
            () = stopping(leaving), if !said_leaving => {
                said_leaving = true;
                wire::send(&mut stream, &Message::Leaving).await.map_err(|e| e.to_string())?;
            }
        }
    }
    handing.phase.send_replace(Phase::Released);
    handing.credentials.retire();
    handing.progress.send_replace(Progress::HandedOver);
    let _ = wire::send(&mut stream, &Message::Released).await;
    Ok(())
}

/// Resolves once the agent is stopping.
async fn stopping(leaving: &mut watch::Receiver<bool>) {
    let _ = leaving.wait_for(|leaving| *leaving).await;
}

/// Only iamlet's own uid may hand over or take over.
fn check_peer(stream: &UnixStream) -> Result<(), String> {
    let uid = nix::unistd::geteuid().as_raw();
    match stream.peer_cred() {
        Ok(peer) if peer.uid() == uid => Ok(()),
        Ok(peer) => Err(format!("refused a peer with uid {}, not iamlet's uid {uid}", peer.uid())),
        Err(error) => Err(format!("cannot read the peer's credentials: {error}")),
    }
}

fn name(message: &Message) -> &'static str {
    match message {
        Message::Hello { .. } => "hello",
        Message::Refused { .. } => "refused",
        Message::Offer { .. } => "offer",
        Message::Credentials { .. } => "credentials",
        Message::Taken => "taken",
        Message::Leaving => "leaving",
        Message::Released => "released",
    }
}

/// How a successor starts.
pub enum Start {
    /// No predecessor took part: none listening (the first start on this boot, or after a
    /// crash), or it refused. Says why, and whether a predecessor (which still holds the
    /// ports) answered.
    Cold { why: String, predecessor: bool },
    /// A predecessor handed over its sockets and credentials.
    Inherited(Inheritance),
}

/// What a predecessor handed over.
pub struct Inheritance {
    /// Its listening sockets: the successor accepts on them once it takes over.
    pub listeners: Vec<(Offered, std::net::TcpListener)>,
    /// Its cached credentials, each with its refresh point.
    pub credentials: Vec<(CredentialKey, Issued)>,
    link: UnixStream,
}

/// Looks for a predecessor in `dir` and takes over from it what it hands over.
pub async fn take_over(dir: &StateDir) -> Start {
    let path = dir.file(SOCKET);
    let cold = |why: String| Start::Cold { why, predecessor: false };
    let mut stream = match UnixStream::connect(&path).await {
        Ok(stream) => stream,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => {
            return cold("no predecessor on this node since it booted".into());
        }
        // An agent ran here on this boot: it crashed (its ports are free), or it is stopping
        // (a deleted pod's drain: its ports are released within its grace period).
        Err(error) if error.kind() == std::io::ErrorKind::ConnectionRefused => {
            let why = "no predecessor answering (it crashed, was killed, or is stopping)".to_string();
            return Start::Cold { why, predecessor: true };
        }
        Err(error) => return cold(format!("cannot reach the predecessor at {}: {error}", path.display())),
    };
    match tokio::time::timeout(EXCHANGE_TIMEOUT, receive_inheritance(&mut stream)).await {
        Ok(Ok((listeners, credentials))) => Start::Inherited(Inheritance { listeners, credentials, link: stream }),
        Ok(Err(Refusal(why))) => Start::Cold { why, predecessor: true },
        Err(_) => Start::Cold { why: "the predecessor did not hand over in time".into(), predecessor: true },
    }
}

/// Why a predecessor handed nothing over (it refused, or the exchange failed).
struct Refusal(String);

impl From<WireError> for Refusal {
    fn from(error: WireError) -> Self {
        Refusal(format!("hand-over failed: {error}"))
    }
}

type Inherited = (Vec<(Offered, std::net::TcpListener)>, Vec<(CredentialKey, Issued)>);

async fn receive_inheritance(stream: &mut UnixStream) -> Result<Inherited, Refusal> {
    check_peer(stream).map_err(Refusal)?;
    wire::send(stream, &Message::Hello { protocol: PROTOCOL, pid: std::process::id() }).await?;
    let (offer, fds) = wire::receive_with_fds(stream).await?;
    let offered = match offer {
        Message::Offer { protocol: PROTOCOL, listeners } => listeners,
        Message::Refused { protocol, reason } => {
            return Err(Refusal(format!("the predecessor (hand-over protocol {protocol}) refused: {reason}")));
        }
        other => return Err(Refusal(format!("expected an offer, got {}", name(&other)))),
    };
    if offered.len() != fds.len() {
        return Err(Refusal(format!("{} listeners offered, {} received", offered.len(), fds.len())));
    }
    let mut listeners = Vec::with_capacity(fds.len());
    for (offered, fd) in offered.into_iter().zip(fds) {
        let listener = std::net::TcpListener::from(fd);
        // A descriptor that is not the listening socket the offer names is refused.
        match listener.local_addr() {
            Ok(addr) if addr == offered.addr => listeners.push((offered, listener)),
            _ => return Err(Refusal(format!("the {} socket offered is not {}", offered.name, offered.addr))),
        }
    }
    let credentials = match wire::receive(stream).await? {
        Message::Credentials { entries } => entries.into_iter().filter_map(Entry::into_parts).collect(),
        other => return Err(Refusal(format!("expected credentials, got {}", name(&other)))),
    };
    Ok((listeners, credentials))
}

impl Inheritance {
    /// Waits until `ready` resolves, or the predecessor is leaving or gone, then lets the
    /// servers accept (`phase`), says `taken` and waits for `released`: from then on only
    /// this agent accepts.
    pub async fn complete(mut self, ready: impl Future<Output = ()>, phase: &watch::Sender<Phase>) {
        tokio::pin!(ready);
        let early = tokio::select! {
            () = &mut ready => None,
            message = wire::receive(&mut self.link) => Some(match message {
                Ok(Message::Leaving) => "the predecessor is stopping".to_string(),
                Ok(other) => format!("the predecessor sent {}", name(&other)),
                Err(error) => format!("the predecessor went away ({error})"),
            }),
        };
        phase.send_replace(Phase::Accepting);
        if let Some(why) = early {
            tracing::warn!(reason = %why, "accepting before ready");
        }
        if let Err(error) = wire::send(&mut self.link, &Message::Taken).await {
            tracing::debug!(%error, "the predecessor is gone: nothing to release");
            return;
        }
        loop {
            match tokio::time::timeout(EXCHANGE_TIMEOUT, wire::receive(&mut self.link)).await {
                Ok(Ok(Message::Released)) => {
                    tracing::info!("took over from the predecessor: this agent answers every new connection");
                    return;
                }
                Ok(Ok(Message::Leaving)) => continue,
                Ok(Ok(other)) => tracing::warn!("the predecessor sent {} instead of released", name(&other)),
                Ok(Err(error)) => tracing::debug!(%error, "the predecessor went away before releasing"),
                Err(_) => tracing::warn!("the predecessor did not release its sockets in time"),
            }
            return;
        }
    }
}
