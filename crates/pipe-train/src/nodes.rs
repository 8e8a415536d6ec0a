//! Training across nodes: one process per node, joined over TCP, summing their gradients.
//!
//! Node 0 (the coordinator) listens at an address every node is given; the others connect to
//! it, say who they are and where they resume from, and are refused unless every node runs
//! the same stage key from the same step. Node 0 then tells every node where the others
//! listen, and each connects to the next (node N − 1 to node 0): a ring.
//!
//! Gradients are summed around the ring (a reduce-scatter, then an all-gather: each node
//! sends and receives 2 (N − 1)/N times the gradient, whatever N), and every element is
//! added in a fixed order — starting at the node whose slice holds it and going round — so
//! the result is the same on every node and the same from run to run, and each node applies
//! the identical update to an identical model. Small values (losses, the stop flag) go
//! through node 0, added in rank order.
//!
//! burn-collective 0.21's global all-reduce was the first choice; it was not used because it
//! has no timeouts (a dead node hangs the others), panics on a lost peer instead of returning
//! an error, and sums in arrival order (README, "Multi-node training").
//!
//! Every read and write has a deadline, and a node that fails sends the others its error, so a
//! node that dies, hangs or fails makes the others stop with a message that names it.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

/// This process's place among the nodes of one run: its rank (0 is the coordinator, which
/// writes checkpoints and outputs), the number of nodes, where node 0 listens, and how long a
/// node waits for another (to join, or to send its part of a step). The engine's
/// [`pipe_core::StageNode`], which `pipe run-stage` is started with.
pub use pipe_core::StageNode as NodeRole;

/// What the nodes must agree on before they train together.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Agreement {
    /// The stage's cache key: the same pipeline, inputs and settings.
    pub key: String,
    /// The step a node resumes from (0: from the start).
    pub step: u64,
    /// The number of replicas on each node.
    pub replicas: usize,
}

#[derive(Debug, Serialize, Deserialize)]
struct Hello {
    rank: usize,
    nodes: usize,
    agreement: Agreement,
    /// Where this node listens for the ring's connection from the node before it.
    ring_port: u16,
}

#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error("node {rank} of {nodes}: {detail}")]
    Role {
        rank: usize,
        nodes: usize,
        detail: String,
    },
    #[error("cannot listen at {address} for the other nodes: {source}; pick another port for the coordinator")]
    Listen {
        address: String,
        source: std::io::Error,
    },
    #[error("{missing} did not join within {secs} s (coordinator {address}); check that they were started, with the same pipeline, and can reach this address")]
    JoinTimeout {
        missing: String,
        address: String,
        secs: u64,
    },
    #[error("cannot reach the coordinator (node 0) at {address} within {secs} s: {last}; check that node 0 is running and that this address reaches it")]
    Unreachable {
        address: String,
        secs: u64,
        last: String,
    },
    #[error("the nodes do not agree: {0}")]
    Disagree(String),
    #[error("node {rank} failed: {message}")]
    PeerFailed { rank: usize, message: String },
    #[error("node {rank} sent nothing for {secs} s ({during}); it may hang or be unreachable, so this node stops too; see its log")]
    PeerTimeout {
        rank: usize,
        secs: u64,
        during: &'static str,
    },
    #[error("node {rank} closed its connection ({during}): it stopped — killed, or failed — see its log; the next run resumes from the last checkpoint")]
    PeerGone { rank: usize, during: &'static str },
    #[error("talking to node {rank} ({during}): {source}")]
    Io {
        rank: usize,
        during: &'static str,
        source: std::io::Error,
    },
}

/// The connections of one run's nodes: on node 0 one per other node (index = rank − 1), on
/// the others one to node 0; and the ring's, to the next node and from the one before.
pub struct NodeGroup {
    role: NodeRole,
    peers: Vec<TcpStream>,
    next: TcpStream,
    previous: TcpStream,
}

const MSG_SUM: u8 = 1;
const MSG_FAILED: u8 = 2;

impl NodeGroup {
    /// Joins the run's other nodes: node 0 waits for all of them, the others connect to it.
    /// Both sides check `agreement`.
    pub fn join(role: &NodeRole, agreement: &Agreement) -> Result<NodeGroup, NodeError> {
        if role.nodes < 2 || role.rank >= role.nodes {
            return Err(NodeError::Role {
                rank: role.rank,
                nodes: role.nodes,
                detail: "a run across nodes needs at least 2 nodes, numbered from 0".into(),
            });
        }
        let listen = listen_address(&role.coordinator).map_err(|detail| NodeError::Role {
            rank: role.rank,
            nodes: role.nodes,
            detail,
        })?;
        // The ring's listener: on the coordinator's interface, at a port the system picks.
        let ring_address = SocketAddr::new(listen.ip(), 0);
        let ring = TcpListener::bind(ring_address).map_err(|source| NodeError::Listen {
            address: ring_address.to_string(),
            source,
        })?;
        let ring_port = ring.local_addr().map(|a| a.port()).unwrap_or(0);
        let (peers, addresses) = if role.rank == 0 {
            accept_all(role, agreement, listen, ring_port)?
        } else {
            let (stream, addresses) = connect(role, agreement, ring_port)?;
            (vec![stream], addresses)
        };
        let (next, previous) = close_ring(role, &ring, &addresses)?;
        Ok(NodeGroup {
            role: role.clone(),
            peers,
            next,
            previous,
        })
    }

    pub fn rank(&self) -> usize {
        self.role.rank
    }

    pub fn nodes(&self) -> usize {
        self.role.nodes
    }

    /// Replaces `values` on every node by their sum over the nodes, around the ring: with
    /// `n` nodes the values fall into `n` slices, and slice `c`'s elements are added in the
    /// order node `c`, `c + 1`, …, `c − 1` (mod `n`).
    pub fn sum_f32(&self, values: &mut [f32]) -> Result<(), NodeError> {
        let (n, r) = (self.role.nodes, self.role.rank);
        let len = values.len();
        let slice = |c: usize| c * len / n..(c + 1) * len / n;
        // Reduce-scatter: after n − 1 rounds node r holds slice r + 1 summed over all nodes.
        for round in 0..n - 1 {
            let send = slice((r + n - round) % n);
            let received = self.pass_on(&values[send])?;
            let into = slice((r + 2 * n - round - 1) % n);
            self.check_length(received.len(), into.len())?;
            for (v, x) in values[into].iter_mut().zip(received) {
                *v += x;
            }
        }
        // All-gather: the summed slices go round once more.
        for round in 0..n - 1 {
            let send = slice((r + 1 + n - round) % n);
            let received = self.pass_on(&values[send])?;
            let into = slice((r + n - round) % n);
            self.check_length(received.len(), into.len())?;
            values[into].copy_from_slice(&received);
        }
        Ok(())
    }

    /// Sends `out` to the next node while it receives what the node before sends.
    fn pass_on(&self, out: &[f32]) -> Result<Vec<f32>, NodeError> {
        let during = "summing a step's gradients";
        let (n, r) = (self.role.nodes, self.role.rank);
        let (next, previous) = ((r + 1) % n, (r + n - 1) % n);
        let mut bytes = vec![0u8; out.len() * 4];
        for (v, b) in out.iter().zip(bytes.chunks_exact_mut(4)) {
            v.put(b);
        }
        let (sent, received) = std::thread::scope(|scope| {
            let sending = scope.spawn(|| write_frame(&self.next, MSG_SUM, &bytes));
            let received = self.read_sum(&self.previous, previous, during);
            (sending.join().expect("sending thread"), received)
        });
        sent.map_err(|e| self.io_error(next, during, e))?;
        Ok(received?.chunks_exact(4).map(f32::get).collect())
    }

    fn check_length(&self, got: usize, expected: usize) -> Result<(), NodeError> {
        if got == expected {
            return Ok(());
        }
        let msg = format!(
            "node {} sent {got} values where node {} has {expected}: the nodes train different models",
            (self.role.rank + self.role.nodes - 1) % self.role.nodes,
            self.role.rank
        );
        self.fail(&msg);
        Err(NodeError::Disagree(msg))
    }

    /// Replaces `values` on every node by their sum over the nodes, added in rank order
    /// through node 0: for a few values (losses, flags).
    pub fn sum_f64(&self, values: &mut [f64]) -> Result<(), NodeError> {
        self.sum(values)
    }

    fn sum<T: Wire>(&self, values: &mut [T]) -> Result<(), NodeError> {
        let mut bytes = vec![0u8; values.len() * T::WIDTH];
        for (v, b) in values.iter().zip(bytes.chunks_exact_mut(T::WIDTH)) {
            v.put(b);
        }
        self.sum_bytes(&mut bytes, T::WIDTH, |acc, part| {
            for (a, p) in acc
                .chunks_exact_mut(T::WIDTH)
                .zip(part.chunks_exact(T::WIDTH))
            {
                (T::get(a) + T::get(p)).put(a);
            }
        })?;
        for (v, b) in values.iter_mut().zip(bytes.chunks_exact(T::WIDTH)) {
            *v = T::get(b);
        }
        Ok(())
    }

    /// True on every node if `flag` is true on any.
    pub fn any(&self, flag: bool) -> Result<bool, NodeError> {
        let mut v = [f64::from(u8::from(flag))];
        self.sum_f64(&mut v)?;
        Ok(v[0] > 0.0)
    }

    /// Tells the other nodes that this one failed, so that they stop at once with its reason
    /// instead of waiting for it. Best effort: the connection may be gone already.
    pub fn fail(&self, message: &str) {
        for peer in self.peers.iter().chain([&self.next]) {
            let _ = write_frame(peer, MSG_FAILED, message.as_bytes());
            let _ = peer.shutdown(Shutdown::Write);
        }
    }

    fn sum_bytes(
        &self,
        bytes: &mut [u8],
        width: usize,
        add: impl Fn(&mut [u8], &[u8]),
    ) -> Result<(), NodeError> {
        let during = "summing a step's gradients";
        if self.role.rank == 0 {
            for (i, peer) in self.peers.iter().enumerate() {
                let rank = i + 1;
                let part = self.read_sum(peer, rank, during)?;
                if part.len() != bytes.len() {
                    let msg = format!(
                        "node {rank} sent {} values where node 0 has {}: the nodes train different models",
                        part.len() / width,
                        bytes.len() / width
                    );
                    self.fail(&msg);
                    return Err(NodeError::Disagree(msg));
                }
                add(bytes, &part);
            }
            for (i, peer) in self.peers.iter().enumerate() {
                write_frame(peer, MSG_SUM, bytes).map_err(|e| self.io_error(i + 1, during, e))?;
            }
        } else {
            let peer = &self.peers[0];
            write_frame(peer, MSG_SUM, bytes).map_err(|e| self.io_error(0, during, e))?;
            let sum = self.read_sum(peer, 0, during)?;
            if sum.len() != bytes.len() {
                return Err(NodeError::Disagree(format!(
                    "node 0 sent {} values where this node has {}",
                    sum.len() / width,
                    bytes.len() / width
                )));
            }
            bytes.copy_from_slice(&sum);
        }
        Ok(())
    }

    fn read_sum(
        &self,
        peer: &TcpStream,
        rank: usize,
        during: &'static str,
    ) -> Result<Vec<u8>, NodeError> {
        match read_frame(peer).map_err(|e| self.io_error(rank, during, e))? {
            (MSG_SUM, body) => Ok(body),
            (MSG_FAILED, body) => Err(NodeError::PeerFailed {
                rank,
                message: String::from_utf8_lossy(&body).into_owned(),
            }),
            (kind, _) => Err(NodeError::Disagree(format!(
                "node {rank} sent a message of unknown kind {kind}: is it running another version of pipe?"
            ))),
        }
    }

    fn io_error(&self, rank: usize, during: &'static str, e: std::io::Error) -> NodeError {
        use std::io::ErrorKind::*;
        match e.kind() {
            WouldBlock | TimedOut => NodeError::PeerTimeout {
                rank,
                secs: self.role.timeout.as_secs(),
                during,
            },
            UnexpectedEof | ConnectionReset | ConnectionAborted | BrokenPipe => {
                NodeError::PeerGone { rank, during }
            }
            _ => NodeError::Io {
                rank,
                during,
                source: e,
            },
        }
    }
}

/// A number as it travels: little-endian, `WIDTH` bytes.
trait Wire: Copy + std::ops::Add<Output = Self> {
    const WIDTH: usize;
    fn get(bytes: &[u8]) -> Self;
    fn put(self, bytes: &mut [u8]);
}

impl Wire for f32 {
    const WIDTH: usize = 4;
    fn get(bytes: &[u8]) -> Self {
        f32::from_le_bytes(bytes.try_into().expect("4 bytes"))
    }
    fn put(self, bytes: &mut [u8]) {
        bytes.copy_from_slice(&self.to_le_bytes());
    }
}

impl Wire for f64 {
    const WIDTH: usize = 8;
    fn get(bytes: &[u8]) -> Self {
        f64::from_le_bytes(bytes.try_into().expect("8 bytes"))
    }
    fn put(self, bytes: &mut [u8]) {
        bytes.copy_from_slice(&self.to_le_bytes());
    }
}

/// A frame: its kind (1 byte), its length (8 bytes, little-endian) and its body.
fn write_frame(mut stream: &TcpStream, kind: u8, body: &[u8]) -> std::io::Result<()> {
    let mut head = [0u8; 9];
    head[0] = kind;
    head[1..].copy_from_slice(&(body.len() as u64).to_le_bytes());
    stream.write_all(&head)?;
    stream.write_all(body)?;
    stream.flush()
}

fn read_frame(mut stream: &TcpStream) -> std::io::Result<(u8, Vec<u8>)> {
    let mut head = [0u8; 9];
    stream.read_exact(&mut head)?;
    let len = u64::from_le_bytes(head[1..].try_into().expect("8 bytes"));
    // A gradient tensor of a large model is a few GiB at most; more is a stray connection.
    if len > 64 << 30 {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("a frame of {len} bytes: not a pipe node"),
        ));
    }
    let mut body = vec![0u8; len as usize];
    stream.read_exact(&mut body)?;
    Ok((head[0], body))
}

fn configure(stream: &TcpStream, timeout: Duration) -> std::io::Result<()> {
    stream.set_nodelay(true)?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))
}

/// Where node 0 listens: the coordinator's port on every interface, or on the loopback
/// interface when the coordinator is a loopback address (a run on one machine).
fn listen_address(coordinator: &str) -> Result<SocketAddr, String> {
    let resolved: Vec<SocketAddr> = coordinator
        .to_socket_addrs()
        .map_err(|e| format!("`{coordinator}` is not a host:port address: {e}"))?
        .collect();
    let first = resolved
        .first()
        .ok_or_else(|| format!("`{coordinator}` resolves to no address"))?;
    if resolved.iter().all(|a| a.ip().is_loopback()) {
        Ok(*first)
    } else {
        Ok(SocketAddr::new(
            std::net::Ipv4Addr::UNSPECIFIED.into(),
            first.port(),
        ))
    }
}

/// Node 0's side of joining: waits for every other node, then tells each where the ring's
/// nodes listen. Returns the connections to the others and that list.
fn accept_all(
    role: &NodeRole,
    agreement: &Agreement,
    address: SocketAddr,
    ring_port: u16,
) -> Result<(Vec<TcpStream>, Vec<String>), NodeError> {
    let listener = TcpListener::bind(address).map_err(|source| NodeError::Listen {
        address: address.to_string(),
        source,
    })?;
    listener
        .set_nonblocking(true)
        .map_err(|source| NodeError::Listen {
            address: address.to_string(),
            source,
        })?;
    let deadline = Instant::now() + role.timeout;
    let mut peers: Vec<Option<TcpStream>> = (1..role.nodes).map(|_| None).collect();
    // Node 0 is reached at the coordinator's host, the others where they connected from.
    let host = role
        .coordinator
        .rsplit_once(':')
        .map_or(role.coordinator.as_str(), |(h, _)| h);
    let mut addresses = vec![format!("{host}:{ring_port}")];
    addresses.resize(role.nodes, String::new());
    while peers.iter().any(Option::is_none) {
        match listener.accept() {
            Ok((stream, from)) => {
                let _ = stream.set_nonblocking(false);
                // A connection that is not a pipe node of this run is turned away; the run
                // goes on waiting for its own.
                if let Some((rank, port, stream)) = greet(stream, role, agreement)? {
                    if peers[rank - 1].is_some() {
                        return Err(NodeError::Disagree(format!(
                            "two nodes say they are node {rank}"
                        )));
                    }
                    addresses[rank] = SocketAddr::new(from.ip(), port).to_string();
                    peers[rank - 1] = Some(stream);
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                if Instant::now() >= deadline {
                    let missing: Vec<String> = peers
                        .iter()
                        .enumerate()
                        .filter(|(_, p)| p.is_none())
                        .map(|(i, _)| (i + 1).to_string())
                        .collect();
                    return Err(NodeError::JoinTimeout {
                        missing: format!(
                            "node{} {}",
                            if missing.len() > 1 { "s" } else { "" },
                            missing.join(", ")
                        ),
                        address: role.coordinator.clone(),
                        secs: role.timeout.as_secs(),
                    });
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(source) => {
                return Err(NodeError::Listen {
                    address: address.to_string(),
                    source,
                })
            }
        }
    }
    let peers: Vec<TcpStream> = peers.into_iter().map(|p| p.expect("all joined")).collect();
    let answer = serde_json::json!({ "ok": true, "ring": addresses });
    for (i, mut peer) in peers.iter().enumerate() {
        writeln!(peer, "{answer}").map_err(|source| NodeError::Io {
            rank: i + 1,
            during: "joining",
            source,
        })?;
    }
    Ok((peers, addresses))
}

/// Connects to the next node of the ring and takes the connection of the one before.
fn close_ring(
    role: &NodeRole,
    listener: &TcpListener,
    addresses: &[String],
) -> Result<(TcpStream, TcpStream), NodeError> {
    let during = "closing the ring";
    let (n, r) = (role.nodes, role.rank);
    let (next_rank, previous_rank) = ((r + 1) % n, (r + n - 1) % n);
    let deadline = Instant::now() + role.timeout;
    let next =
        dial(&addresses[next_rank], deadline, Duration::from_millis(50)).map_err(|source| {
            NodeError::Io {
                rank: next_rank,
                during,
                source,
            }
        })?;
    configure(&next, role.timeout).map_err(|source| NodeError::Io {
        rank: next_rank,
        during,
        source,
    })?;
    (&next)
        .write_all(&(r as u64).to_le_bytes())
        .map_err(|source| NodeError::Io {
            rank: next_rank,
            during,
            source,
        })?;
    let _ = listener.set_nonblocking(true);
    loop {
        match listener.accept() {
            Ok((stream, _)) => {
                let _ = stream.set_nonblocking(false);
                let mut who = [0u8; 8];
                let ok = configure(&stream, role.timeout).is_ok()
                    && (&stream).read_exact(&mut who).is_ok();
                // Anything but the node before is a stray connection.
                if ok && u64::from_le_bytes(who) == previous_rank as u64 {
                    return Ok((next, stream));
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                if Instant::now() >= deadline {
                    return Err(NodeError::PeerTimeout {
                        rank: previous_rank,
                        secs: role.timeout.as_secs(),
                        during,
                    });
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(source) => {
                return Err(NodeError::Io {
                    rank: previous_rank,
                    during,
                    source,
                })
            }
        }
    }
}

/// Connects to `address`, trying again every `pause` until `deadline` (it may not listen yet).
fn dial(address: &str, deadline: Instant, pause: Duration) -> std::io::Result<TcpStream> {
    loop {
        let attempt = address.to_socket_addrs().and_then(|mut addrs| {
            let a = addrs
                .next()
                .ok_or_else(|| std::io::Error::new(std::io::ErrorKind::NotFound, "no address"))?;
            TcpStream::connect_timeout(&a, Duration::from_secs(5))
        });
        match attempt {
            Ok(s) => return Ok(s),
            Err(e) if Instant::now() >= deadline => return Err(e),
            Err(_) => std::thread::sleep(pause),
        }
    }
}

/// Reads a joining node's hello: the node's rank, ring port and stream if it belongs to this
/// run, `None` for a stray connection, an error (told to it too) if it is of this run but
/// disagrees. It is answered once all have joined.
fn greet(
    stream: TcpStream,
    role: &NodeRole,
    agreement: &Agreement,
) -> Result<Option<(usize, u16, TcpStream)>, NodeError> {
    if configure(&stream, role.timeout).is_err() {
        return Ok(None);
    }
    let mut line = String::new();
    let mut reader = BufReader::new(&stream);
    if reader.read_line(&mut line).is_err() {
        return Ok(None);
    }
    let Ok(hello) = serde_json::from_str::<Hello>(&line) else {
        return Ok(None);
    };
    let refuse = |msg: String| -> NodeError {
        let _ = writeln!(&stream, "{}", serde_json::json!({ "refused": msg }));
        NodeError::Disagree(msg)
    };
    if hello.nodes != role.nodes {
        return Err(refuse(format!(
            "node {} was started for {} nodes, node 0 for {}",
            hello.rank, hello.nodes, role.nodes
        )));
    }
    if hello.rank == 0 || hello.rank >= role.nodes {
        return Err(refuse(format!(
            "a node says it is node {} of {}; the others are numbered 1 to {}",
            hello.rank,
            hello.nodes,
            role.nodes - 1
        )));
    }
    let theirs = &hello.agreement;
    if theirs.key != agreement.key {
        return Err(refuse(format!(
            "node {} runs the stage with key {}, node 0 with key {}: the nodes must run the same pipeline, settings and inputs",
            hello.rank, theirs.key, agreement.key
        )));
    }
    if theirs.step != agreement.step {
        return Err(refuse(format!(
            "node {} resumes from step {}, node 0 from step {}: they must read the same checkpoint (a shared work directory)",
            hello.rank, theirs.step, agreement.step
        )));
    }
    if theirs.replicas != agreement.replicas {
        return Err(refuse(format!(
            "node {} has {} replicas, node 0 has {}: every node must list the same devices",
            hello.rank, theirs.replicas, agreement.replicas
        )));
    }
    if reader.buffer().is_empty() {
        Ok(Some((hello.rank, hello.ring_port, stream)))
    } else {
        Err(refuse(format!(
            "node {} sent more than its hello",
            hello.rank
        )))
    }
}

/// The other nodes' side of joining: connects to node 0, says who it is, and waits for all to
/// have joined. Returns the connection and where the ring's nodes listen.
fn connect(
    role: &NodeRole,
    agreement: &Agreement,
    ring_port: u16,
) -> Result<(TcpStream, Vec<String>), NodeError> {
    let deadline = Instant::now() + role.timeout;
    let address = role.coordinator.clone();
    // Node 0 may not be listening yet.
    let stream = dial(&address, deadline, Duration::from_millis(100)).map_err(|e| {
        NodeError::Unreachable {
            address: address.clone(),
            secs: role.timeout.as_secs(),
            last: e.to_string(),
        }
    })?;
    let during = "joining";
    let io = |source| NodeError::Io {
        rank: 0,
        during,
        source,
    };
    configure(&stream, role.timeout).map_err(io)?;
    let hello = Hello {
        rank: role.rank,
        nodes: role.nodes,
        agreement: agreement.clone(),
        ring_port,
    };
    writeln!(&stream, "{}", serde_json::to_string(&hello).expect("json")).map_err(io)?;
    // One byte at a time: what follows the answer is not ours to read. Node 0 answers once
    // every node has joined, which may take up to its timeout.
    let mut answer = Vec::new();
    let mut byte = [0u8; 1];
    loop {
        match (&stream).read(&mut byte) {
            Ok(0) => {
                return Err(NodeError::PeerGone {
                    rank: 0,
                    during: "joining",
                })
            }
            Ok(_) if byte[0] == b'\n' => break,
            Ok(_) => answer.push(byte[0]),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => {
                return Err(match e.kind() {
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => {
                        NodeError::PeerTimeout {
                            rank: 0,
                            secs: role.timeout.as_secs(),
                            during,
                        }
                    }
                    _ => io(e),
                })
            }
        }
    }
    let answer: serde_json::Value = serde_json::from_slice(&answer).unwrap_or_default();
    if let Some(msg) = answer.get("refused").and_then(|m| m.as_str()) {
        return Err(NodeError::Disagree(msg.to_string()));
    }
    let ring: Option<Vec<String>> = answer
        .get("ring")
        .and_then(|r| serde_json::from_value(r.clone()).ok());
    match ring {
        Some(ring)
            if answer.get("ok").and_then(|v| v.as_bool()) == Some(true)
                && ring.len() == role.nodes =>
        {
            Ok((stream, ring))
        }
        _ => Err(NodeError::Disagree(format!(
            "{address} answered, but not as node 0 of a pipe run"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn role(rank: usize, nodes: usize, port: u16, timeout_ms: u64) -> NodeRole {
        NodeRole {
            rank,
            nodes,
            coordinator: format!("127.0.0.1:{port}"),
            timeout: Duration::from_millis(timeout_ms),
        }
    }

    fn agreement(step: u64) -> Agreement {
        Agreement {
            key: "k".into(),
            step,
            replicas: 1,
        }
    }

    /// Node `rank`'s `len` values: magnitudes far apart, so that the order of the additions
    /// shows in the result.
    fn values(rank: usize, len: usize) -> Vec<f32> {
        (0..len)
            .map(|i| [1e8f32, 1.0, -1e8, 3.5e-3][(rank + i) % 4] * (1.0 + i as f32 / 7.0))
            .collect()
    }

    #[test]
    fn three_nodes_sum_around_the_ring_in_a_fixed_order_and_agree_bit_for_bit() {
        let port = pipe_testkit::free_loopback_port();
        let lengths = [7usize, 1, 0, 3];
        let results: Vec<Vec<(Vec<f32>, f64, bool)>> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..3)
                .map(|rank| {
                    s.spawn(move || {
                        let g =
                            NodeGroup::join(&role(rank, 3, port, 10_000), &agreement(7)).unwrap();
                        lengths
                            .iter()
                            .map(|&len| {
                                let mut v = values(rank, len);
                                g.sum_f32(&mut v).unwrap();
                                let mut w = [0.1 * rank as f64];
                                g.sum_f64(&mut w).unwrap();
                                (v, w[0], g.any(rank == 2).unwrap())
                            })
                            .collect()
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        for (k, &len) in lengths.iter().enumerate() {
            // Element i lies in slice c (of 3); its sum starts at node c and goes round.
            let expected: Vec<f32> = (0..len)
                .map(|i| {
                    let c = (0..3).find(|&c| (c * len / 3..(c + 1) * len / 3).contains(&i));
                    let c = c.unwrap();
                    let at = |r: usize| values(r, len)[i];
                    (at(c) + at((c + 1) % 3)) + at((c + 2) % 3)
                })
                .collect();
            for node in &results {
                let (v, w, any) = &node[k];
                let bits = |x: &[f32]| x.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
                assert_eq!(bits(v), bits(&expected), "length {len}");
                assert_eq!(w.to_bits(), ((0.0 + 0.1) + 0.2f64).to_bits());
                assert!(any);
            }
        }
        // The order matters for these values: not every slice adds in rank order.
        let len = 7;
        let rank_order: Vec<f32> = (0..len)
            .map(|i| (values(0, len)[i] + values(1, len)[i]) + values(2, len)[i])
            .collect();
        assert_ne!(results[0][0].0, rank_order);
    }

    #[test]
    fn a_node_that_resumes_elsewhere_is_refused_on_both_sides() {
        let port = pipe_testkit::free_loopback_port();
        let (a, b) = std::thread::scope(|s| {
            let a = s.spawn(move || NodeGroup::join(&role(0, 2, port, 10_000), &agreement(4)));
            let b = s.spawn(move || NodeGroup::join(&role(1, 2, port, 10_000), &agreement(2)));
            (a.join().unwrap(), b.join().unwrap())
        });
        for e in [a.err().unwrap(), b.err().unwrap()] {
            let msg = e.to_string();
            assert!(
                msg.contains("node 1 resumes from step 2, node 0 from step 4"),
                "{msg}"
            );
        }
    }

    #[test]
    fn a_missing_node_times_out_with_its_rank() {
        let port = pipe_testkit::free_loopback_port();
        let t = Instant::now();
        let e = NodeGroup::join(&role(0, 3, port, 300), &agreement(0))
            .err()
            .unwrap();
        assert!(t.elapsed() < Duration::from_secs(5));
        let msg = e.to_string();
        assert!(msg.contains("nodes 1, 2 did not join within"), "{msg}");
        let e = NodeGroup::join(
            &role(1, 2, pipe_testkit::free_loopback_port(), 300),
            &agreement(0),
        )
        .err()
        .unwrap();
        assert!(
            e.to_string().contains("cannot reach the coordinator"),
            "{e}"
        );
    }

    #[test]
    fn a_node_that_dies_or_hangs_or_fails_stops_the_others_with_a_message() {
        // Dies: its connection closes mid-run.
        let port = pipe_testkit::free_loopback_port();
        let err = std::thread::scope(|s| {
            let a = s.spawn(move || {
                let g = NodeGroup::join(&role(0, 2, port, 10_000), &agreement(0)).unwrap();
                g.sum_f32(&mut [1.0]).unwrap();
                g.sum_f32(&mut [1.0]).err().unwrap()
            });
            let g = NodeGroup::join(&role(1, 2, port, 10_000), &agreement(0)).unwrap();
            g.sum_f32(&mut [2.0]).unwrap();
            drop(g);
            a.join().unwrap()
        });
        assert!(matches!(err, NodeError::PeerGone { rank: 1, .. }), "{err}");
        // Hangs: nothing arrives within the timeout.
        let port = pipe_testkit::free_loopback_port();
        let err = std::thread::scope(|s| {
            let b = s.spawn(move || {
                let g = NodeGroup::join(&role(1, 2, port, 500), &agreement(0)).unwrap();
                std::thread::sleep(Duration::from_millis(1500));
                drop(g);
            });
            let g = NodeGroup::join(&role(0, 2, port, 500), &agreement(0)).unwrap();
            let t = Instant::now();
            let e = g.sum_f32(&mut [1.0]).err().unwrap();
            assert!(t.elapsed() < Duration::from_millis(1400));
            b.join().unwrap();
            e
        });
        assert!(
            matches!(err, NodeError::PeerTimeout { rank: 1, .. }),
            "{err}"
        );
        // Fails: its reason reaches the others.
        let port = pipe_testkit::free_loopback_port();
        let err = std::thread::scope(|s| {
            s.spawn(move || {
                let g = NodeGroup::join(&role(1, 2, port, 10_000), &agreement(0)).unwrap();
                g.fail("the disk is full");
            });
            let g = NodeGroup::join(&role(0, 2, port, 10_000), &agreement(0)).unwrap();
            g.sum_f32(&mut [1.0]).err().unwrap()
        });
        assert_eq!(err.to_string(), "node 1 failed: the disk is full");
    }
}
