//! The hand-over protocol's messages and framing on the Unix socket.
//!
//! A frame is a 4-byte big-endian length and that many bytes of JSON. The listening sockets
//! travel as `SCM_RIGHTS` with the first byte of the `offer` frame, in the order the offer
//! lists them. `hello` and `refused` never change shape, so any two versions can tell each
//! other that they do not speak the same protocol; everything else is read only after both
//! said the same [`PROTOCOL`].

use std::io::IoSlice;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use nix::sys::socket::{ControlMessage, ControlMessageOwned, MsgFlags, recvmsg, sendmsg};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt, AsyncWriteExt, Interest};
use tokio::net::UnixStream;

use crate::credentials::{Credentials, Issued};
use crate::policy::RoleArn;
use crate::resolve::{CredentialKey, SessionScope, SessionTag, TAG_KEYS};

/// The protocol this build speaks. A successor and a predecessor that differ hand over
/// nothing: the successor starts cold.
pub const PROTOCOL: u32 = 1;

/// The largest frame read: 20,000 cached credentials with room to spare.
const MAX_FRAME: usize = 64 << 20;

/// Most listening sockets an offer carries (the metadata API on IPv4 and IPv6, the admin port).
pub const MAX_LISTENERS: usize = 4;

/// One message.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Message {
    /// Successor to predecessor, first: who it is and what it speaks.
    Hello {
        protocol: u32,
        pid: u32,
    },
    /// Predecessor to successor: nothing is handed over, and why.
    Refused {
        protocol: u32,
        reason: String,
    },
    /// Predecessor to successor: its listening sockets (attached), then its credentials.
    Offer {
        protocol: u32,
        listeners: Vec<Offered>,
    },
    Credentials {
        entries: Vec<Entry>,
    },
    /// Successor: it accepts on the sockets now; the predecessor may stop accepting.
    Taken,
    /// Predecessor: it was told to stop (SIGTERM) before the successor took over; the
    /// successor should accept at once.
    Leaving,
    /// Predecessor: it no longer accepts; the successor now answers every new connection.
    Released,
}

/// A listening socket in an offer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Offered {
    /// `app` (the metadata API) or `admin`.
    pub name: String,
    pub addr: std::net::SocketAddr,
}

/// One cached credential.
#[derive(Serialize, Deserialize)]
pub struct Entry {
    role: String,
    external_id: Option<String>,
    /// `--session-scope` of the predecessor (`pod` when it was older than the flag). A key of
    /// another scope than the successor's is adopted but never asked for, and is forgotten at
    /// the first refresh scan, as no pod keeps its session alive here.
    #[serde(default = "pod_scope")]
    scope: String,
    session_name: String,
    tags: Option<Vec<(String, String)>>,
    /// Absent from a predecessor older than `--source-identity`.
    #[serde(default)]
    source_identity: Option<String>,
    access_key_id: String,
    secret_access_key: String,
    session_token: String,
    /// Unix seconds.
    expiration: u64,
    obtained: u64,
    refresh_at: u64,
}

impl std::fmt::Debug for Entry {
    /// The key only: the secret key and the session token are never printed.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Entry")
            .field("role", &self.role)
            .field("session_name", &self.session_name)
            .field("access_key_id", &self.access_key_id)
            .finish_non_exhaustive()
    }
}

fn pod_scope() -> String {
    SessionScope::Pod.as_str().to_string()
}

fn seconds(at: SystemTime) -> u64 {
    at.duration_since(UNIX_EPOCH).unwrap_or_default().as_secs()
}

fn time(seconds: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(seconds)
}

impl Entry {
    pub fn new(key: &CredentialKey, issued: &Issued) -> Self {
        let credentials = &issued.credentials;
        Self {
            role: key.role.as_str().to_string(),
            external_id: key.external_id.as_deref().map(str::to_string),
            scope: key.scope.as_str().to_string(),
            session_name: key.session_name.to_string(),
            tags: key.tags.as_ref().map(|tags| tags.iter().map(|t| (t.key.to_string(), t.value.clone())).collect()),
            source_identity: key.source_identity.as_deref().map(str::to_string),
            access_key_id: credentials.access_key_id.clone(),
            secret_access_key: credentials.secret_access_key.clone(),
            session_token: credentials.session_token.clone(),
            expiration: seconds(credentials.expiration),
            obtained: seconds(issued.obtained),
            refresh_at: seconds(issued.refresh_at),
        }
    }

    /// The key and credentials, or `None` for an entry this build cannot key (an unknown tag
    /// or a malformed ARN): it is fetched again instead.
    pub fn into_parts(self) -> Option<(CredentialKey, Issued)> {
        let tags = match self.tags {
            Some(tags) => Some(
                tags.into_iter()
                    .map(|(key, value)| {
                        TAG_KEYS.iter().find(|known| **known == key).map(|key| SessionTag { key, value })
                    })
                    .collect::<Option<Vec<_>>>()?
                    .into(),
            ),
            None => None,
        };
        let key = CredentialKey {
            role: RoleArn::parse(&self.role).ok()?,
            external_id: self.external_id.map(Into::into),
            scope: SessionScope::parse(&self.scope)?,
            session_name: self.session_name.into(),
            tags,
            source_identity: self.source_identity.map(Into::into),
        };
        let credentials = Credentials {
            access_key_id: self.access_key_id,
            secret_access_key: self.secret_access_key,
            session_token: self.session_token,
            expiration: time(self.expiration),
        };
        Some((key, Issued::new(credentials, time(self.obtained)).refreshed_at(time(self.refresh_at))))
    }
}

/// Why a frame could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum WireError {
    #[error("the other agent closed the connection")]
    Closed,
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("frame of {0} bytes is larger than allowed")]
    TooLarge(usize),
    #[error("unreadable message: {0}")]
    Json(#[from] serde_json::Error),
    #[error("{0}")]
    Protocol(String),
}

fn frame(message: &Message) -> Result<Vec<u8>, WireError> {
    let json = serde_json::to_vec(message)?;
    let mut bytes = Vec::with_capacity(4 + json.len());
    bytes.extend_from_slice(&u32::try_from(json.len()).map_err(|_| WireError::TooLarge(json.len()))?.to_be_bytes());
    bytes.extend_from_slice(&json);
    Ok(bytes)
}

/// Writes `message`.
pub async fn send(stream: &mut UnixStream, message: &Message) -> Result<(), WireError> {
    stream.write_all(&frame(message)?).await?;
    Ok(())
}

/// Writes `message` with `fds` attached to its first byte.
pub async fn send_with_fds(stream: &mut UnixStream, message: &Message, fds: &[RawFd]) -> Result<(), WireError> {
    let bytes = frame(message)?;
    let raw = stream.as_raw_fd();
    // The first byte alone carries the descriptors, so a short write cannot split them.
    let sent = stream
        .async_io(Interest::WRITABLE, || {
            let cmsgs = [ControlMessage::ScmRights(fds)];
            sendmsg::<()>(raw, &[IoSlice::new(&bytes[..1])], &cmsgs, MsgFlags::MSG_NOSIGNAL, None)
                .map_err(std::io::Error::from)
        })
        .await?;
    stream.write_all(&bytes[sent..]).await?;
    Ok(())
}

/// Reads one message.
pub async fn receive(stream: &mut UnixStream) -> Result<Message, WireError> {
    let mut length = [0u8; 4];
    read_exact(stream, &mut length).await?;
    read_body(stream, u32::from_be_bytes(length) as usize).await
}

/// Reads one message and the descriptors attached to its first byte (at most
/// [`MAX_LISTENERS`]; any beyond that are closed by the kernel).
pub async fn receive_with_fds(stream: &mut UnixStream) -> Result<(Message, Vec<OwnedFd>), WireError> {
    let raw = stream.as_raw_fd();
    let mut first = [0u8; 1];
    let (read, fds) = stream
        .async_io(Interest::READABLE, || {
            let mut space = nix::cmsg_space!([RawFd; MAX_LISTENERS]);
            let mut iov = [std::io::IoSliceMut::new(&mut first)];
            let message = recvmsg::<()>(raw, &mut iov, Some(&mut space), MsgFlags::MSG_CMSG_CLOEXEC)
                .map_err(std::io::Error::from)?;
            let mut fds = Vec::new();
            for cmsg in message.cmsgs().map_err(std::io::Error::from)? {
                if let ControlMessageOwned::ScmRights(received) = cmsg {
                    // SAFETY: the kernel just installed these descriptors in this process,
                    // and nothing else refers to them.
                    fds.extend(received.into_iter().map(|fd| unsafe { OwnedFd::from_raw_fd(fd) }));
                }
            }
            Ok((message.bytes, fds))
        })
        .await?;
    if read == 0 {
        return Err(WireError::Closed);
    }
    let mut length = [0u8; 4];
    length[0] = first[0];
    read_exact(stream, &mut length[1..]).await?;
    let message = read_body(stream, u32::from_be_bytes(length) as usize).await?;
    Ok((message, fds))
}

async fn read_body(stream: &mut UnixStream, length: usize) -> Result<Message, WireError> {
    if length > MAX_FRAME {
        return Err(WireError::TooLarge(length));
    }
    let mut body = vec![0u8; length];
    read_exact(stream, &mut body).await?;
    Ok(serde_json::from_slice(&body)?)
}

async fn read_exact(stream: &mut UnixStream, buffer: &mut [u8]) -> Result<(), WireError> {
    match stream.read_exact(buffer).await {
        Ok(_) => Ok(()),
        Err(error) if error.kind() == std::io::ErrorKind::UnexpectedEof => Err(WireError::Closed),
        Err(error) => Err(error.into()),
    }
}

#[cfg(test)]
mod tests {
    use std::os::fd::AsFd;

    use super::*;

    #[tokio::test]
    async fn messages_and_descriptors_cross_the_socket() {
        let (mut a, mut b) = UnixStream::pair().unwrap();
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let offer = Message::Offer { protocol: PROTOCOL, listeners: vec![Offered { name: "app".into(), addr }] };
        send_with_fds(&mut a, &offer, &[listener.as_fd().as_raw_fd()]).await.unwrap();
        send(&mut a, &Message::Taken).await.unwrap();
        let (received, fds) = receive_with_fds(&mut b).await.unwrap();
        assert!(matches!(received, Message::Offer { protocol: PROTOCOL, listeners } if listeners[0].addr == addr));
        let adopted = std::net::TcpListener::from(fds.into_iter().next().unwrap());
        assert_eq!(adopted.local_addr().unwrap(), addr, "the same listening socket");
        assert!(matches!(receive(&mut b).await.unwrap(), Message::Taken));
        drop(a);
        assert!(matches!(receive(&mut b).await, Err(WireError::Closed)));
    }

    #[tokio::test]
    async fn a_frame_too_large_or_garbage_is_refused() {
        let (mut a, mut b) = UnixStream::pair().unwrap();
        a.write_all(&u32::MAX.to_be_bytes()).await.unwrap();
        assert!(matches!(receive(&mut b).await, Err(WireError::TooLarge(_))));
        let (mut a, mut b) = UnixStream::pair().unwrap();
        a.write_all(&[0, 0, 0, 3, b'{', b'x', b'}']).await.unwrap();
        assert!(matches!(receive(&mut b).await, Err(WireError::Json(_))));
    }

    #[test]
    fn hello_and_refused_keep_their_shape() {
        // Any version must read these: the shape is frozen.
        let hello = serde_json::to_string(&Message::Hello { protocol: 7, pid: 1 }).unwrap();
        assert_eq!(hello, r#"{"type":"hello","protocol":7,"pid":1}"#);
        let refused = serde_json::to_string(&Message::Refused { protocol: 1, reason: "r".into() }).unwrap();
        assert_eq!(refused, r#"{"type":"refused","protocol":1,"reason":"r"}"#);
    }

    #[test]
    fn a_credential_crosses_whole_and_an_unknown_tag_is_dropped() {
        let key = CredentialKey {
            role: RoleArn::parse("arn:aws:iam::123456789012:role/app").unwrap(),
            external_id: Some("ext".into()),
            scope: SessionScope::ServiceAccount,
            session_name: "shop@web".into(),
            tags: Some(vec![SessionTag { key: TAG_KEYS[1], value: "shop".into() }].into()),
            source_identity: Some("shop@web".into()),
        };
        let expiration = UNIX_EPOCH + Duration::from_secs(2_000_000_000);
        let credentials = Credentials {
            access_key_id: "ASIA".into(),
            secret_access_key: "s".into(),
            session_token: "t".into(),
            expiration,
        };
        let issued = Issued::new(credentials.clone(), UNIX_EPOCH + Duration::from_secs(1_999_990_000))
            .refreshed_at(expiration - Duration::from_secs(900));
        let json = serde_json::to_vec(&Entry::new(&key, &issued)).unwrap();
        let (back_key, back) = serde_json::from_slice::<Entry>(&json).unwrap().into_parts().unwrap();
        assert_eq!(back_key, key);
        assert_eq!(back.credentials, credentials);
        assert_eq!((back.obtained, back.refresh_at), (issued.obtained, issued.refresh_at));

        let mut entry = Entry::new(&key, &issued);
        entry.tags = Some(vec![("from-a-later-version".into(), "x".into())]);
        assert!(entry.into_parts().is_none(), "fetched again rather than keyed wrong");
        let mut entry = Entry::new(&key, &issued);
        entry.scope = "namespace".into();
        assert!(entry.into_parts().is_none(), "a scope of a later version: fetched again");

        // A predecessor older than --session-scope sent no scope: its sessions were pods'.
        let mut old = serde_json::to_value(Entry::new(&key, &issued)).unwrap();
        old.as_object_mut().unwrap().remove("scope");
        let (old_key, _) = serde_json::from_value::<Entry>(old).unwrap().into_parts().unwrap();
        assert_eq!(old_key.scope, SessionScope::Pod);
    }
}
