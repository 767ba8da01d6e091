//! A TCP communicator for launches without MPI (torchrun / Slurm environment variables).
//!
//! Rendezvous: rank 0 listens at `MASTER_ADDR:MASTER_PORT`; every other rank opens its own
//! listener, connects to rank 0 and tells it its rank and port; rank 0 answers with the table of
//! addresses, and each rank then connects to every lower rank: a full mesh of one socket per
//! pair. Collectives go through the group's first member, which reduces in rank order, so every
//! rank gets the same bits.
//!
//! Failure: every socket has a read timeout, and a peer that exits closes its sockets, so a
//! rank waiting in a collective returns an error naming the peer (closed connection, or no
//! message within the timeout) instead of hanging. Each message carries a group id and sequence
//! number; a mismatch (ranks calling collectives in different orders) is an error too.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::comm::{check_gather, split_members, Communicator, ReduceOp};
use crate::{DistError, Result};

const MAGIC: u32 = 0x4f50_5444; // "OPTD"

/// The sockets of one process: `links[r]` talks to global rank `r` (`None` for itself).
struct Links {
    rank: usize,
    links: Vec<Option<Mutex<TcpStream>>>,
    timeout: Duration,
}

impl Links {
    fn link(&self, peer: usize) -> Result<std::sync::MutexGuard<'_, TcpStream>> {
        let l = self.links.get(peer).and_then(|l| l.as_ref()).ok_or_else(|| DistError::Peer {
            rank: peer,
            detail: format!("rank {} has no connection to it", self.rank),
        })?;
        l.lock().map_err(|_| DistError::Peer { rank: peer, detail: "connection lock poisoned".into() })
    }

    fn send(&self, peer: usize, group: u64, seq: u64, payload: &[u8]) -> Result<()> {
        let mut s = self.link(peer)?;
        let mut head = [0u8; 28];
        head[0..4].copy_from_slice(&MAGIC.to_le_bytes());
        head[4..12].copy_from_slice(&group.to_le_bytes());
        head[12..20].copy_from_slice(&seq.to_le_bytes());
        head[20..28].copy_from_slice(&(payload.len() as u64).to_le_bytes());
        s.write_all(&head).and_then(|_| s.write_all(payload)).map_err(|e| self.io_err(peer, "sending to", e))
    }

    fn recv(&self, peer: usize, group: u64, seq: u64) -> Result<Vec<u8>> {
        let mut s = self.link(peer)?;
        let mut head = [0u8; 28];
        s.read_exact(&mut head).map_err(|e| self.io_err(peer, "waiting for", e))?;
        let word = |a: usize, b: usize| u64::from_le_bytes(head[a..b].try_into().unwrap_or([0; 8]));
        let magic = u32::from_le_bytes([head[0], head[1], head[2], head[3]]);
        let (g, q, len) = (word(4, 12), word(12, 20), word(20, 28));
        if magic != MAGIC || g != group || q != seq {
            return Err(DistError::Peer {
                rank: peer,
                detail: format!(
                    "out-of-order collective: got group {g:#x} #{q}, expected group {group:#x} #{seq} \
                     (ranks must issue collectives in the same order)"
                ),
            });
        }
        let mut buf = vec![0u8; len as usize];
        s.read_exact(&mut buf).map_err(|e| self.io_err(peer, "reading from", e))?;
        Ok(buf)
    }

    fn io_err(&self, peer: usize, what: &str, e: std::io::Error) -> DistError {
        use std::io::ErrorKind::*;
        let detail = match e.kind() {
            WouldBlock | TimedOut => format!(
                "rank {} got no message from it within {:.0?} while {what} it (it died, hangs, or is \
                 far behind)",
                self.rank, self.timeout
            ),
            UnexpectedEof | ConnectionReset | BrokenPipe | ConnectionAborted => {
                format!("connection closed while rank {} was {what} it: the process exited or died", self.rank)
            }
            _ => format!("{what}: {e}"),
        };
        DistError::Peer { rank: peer, detail }
    }
}

/// A group over the TCP mesh: `members[i]` is the global rank of group rank `i`.
pub struct TcpComm {
    links: Arc<Links>,
    members: Vec<usize>,
    me: usize,
    group: u64,
    seq: AtomicU64,
    splits: AtomicU64,
}

fn f32_bytes(x: &[f32]) -> Vec<u8> {
    x.iter().flat_map(|v| v.to_le_bytes()).collect()
}

fn bytes_f32(b: &[u8], out: &mut [f32], peer: usize) -> Result<()> {
    if b.len() != out.len() * 4 {
        return Err(DistError::Peer {
            rank: peer,
            detail: format!("sent {} bytes, expected {}", b.len(), out.len() * 4),
        });
    }
    for (o, c) in out.iter_mut().zip(b.chunks_exact(4)) {
        *o = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
    }
    Ok(())
}

fn accept_until(l: &TcpListener, deadline: Instant, addr: &str) -> Result<TcpStream> {
    let err = |detail: String| DistError::Rendezvous { addr: addr.to_string(), detail };
    l.set_nonblocking(true).map_err(|e| err(e.to_string()))?;
    loop {
        match l.accept() {
            Ok((s, _)) => {
                s.set_nonblocking(false).map_err(|e| err(e.to_string()))?;
                return Ok(s);
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                if Instant::now() > deadline {
                    return Err(err("timed out waiting for the other ranks to connect".into()));
                }
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(e) => return Err(err(e.to_string())),
        }
    }
}

fn connect_until(addr: SocketAddr, deadline: Instant) -> Result<TcpStream> {
    loop {
        match TcpStream::connect_timeout(&addr, Duration::from_secs(1)) {
            Ok(s) => return Ok(s),
            Err(e) => {
                if Instant::now() > deadline {
                    return Err(DistError::Rendezvous {
                        addr: addr.to_string(),
                        detail: format!("cannot connect: {e}"),
                    });
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }
}

fn read_u32(s: &mut TcpStream, addr: &str) -> Result<u32> {
    let mut b = [0u8; 4];
    s.read_exact(&mut b).map_err(|e| DistError::Rendezvous { addr: addr.into(), detail: format!("handshake: {e}") })?;
    Ok(u32::from_le_bytes(b))
}

fn write_all(s: &mut TcpStream, b: &[u8], addr: &str) -> Result<()> {
    s.write_all(b).map_err(|e| DistError::Rendezvous { addr: addr.into(), detail: format!("handshake: {e}") })
}

impl TcpComm {
    /// Join the rendezvous at `master` as `rank` of `size`. Rank 0 binds `master` (or uses
    /// `listener` if given, e.g. one bound to port 0 by a test). `timeout` bounds the rendezvous
    /// and every later wait for a peer.
    pub fn rendezvous(
        rank: usize,
        size: usize,
        master: &str,
        listener: Option<TcpListener>,
        timeout: Duration,
    ) -> Result<TcpComm> {
        if size == 0 || rank >= size {
            return Err(DistError::Env(format!("rank {rank} is not below world size {size}")));
        }
        let deadline = Instant::now() + timeout;
        let rerr = |detail: String| DistError::Rendezvous { addr: master.to_string(), detail };
        let mut links: Vec<Option<TcpStream>> = (0..size).map(|_| None).collect();
        if rank == 0 {
            let l = match listener {
                Some(l) => l,
                None => TcpListener::bind(master).map_err(|e| rerr(format!("bind: {e}")))?,
            };
            // Collect (rank, ip, port) of every other rank.
            let mut table = vec![(String::new(), 0u16); size];
            for _ in 1..size {
                let mut s = accept_until(&l, deadline, master)?;
                s.set_read_timeout(Some(timeout)).map_err(|e| rerr(e.to_string()))?;
                let r = read_u32(&mut s, master)? as usize;
                let port = read_u32(&mut s, master)? as u16;
                let n = read_u32(&mut s, master)? as usize;
                if r == 0 || r >= size || n != size || links[r].is_some() {
                    return Err(rerr(format!("a rank announced itself as {r} of {n} (world is {size})")));
                }
                let ip = s.peer_addr().map_err(|e| rerr(e.to_string()))?.ip().to_string();
                table[r] = (ip, port);
                links[r] = Some(s);
            }
            let text: String = table.iter().map(|(ip, p)| format!("{ip} {p}\n")).collect();
            for s in links.iter_mut().flatten() {
                write_all(s, &(text.len() as u32).to_le_bytes(), master)?;
                write_all(s, text.as_bytes(), master)?;
            }
        } else {
            let addr = master
                .to_socket_addrs()
                .map_err(|e| rerr(format!("resolve: {e}")))?
                .next()
                .ok_or_else(|| rerr("resolves to no address".into()))?;
            let own = TcpListener::bind(("0.0.0.0", 0)).map_err(|e| rerr(format!("bind own listener: {e}")))?;
            let port = own.local_addr().map_err(|e| rerr(e.to_string()))?.port();
            let mut s = connect_until(addr, deadline)?;
            s.set_read_timeout(Some(timeout)).map_err(|e| rerr(e.to_string()))?;
            for v in [rank as u32, port as u32, size as u32] {
                write_all(&mut s, &v.to_le_bytes(), master)?;
            }
            let len = read_u32(&mut s, master)? as usize;
            let mut text = vec![0u8; len];
            s.read_exact(&mut text).map_err(|e| rerr(format!("address table: {e}")))?;
            let text = String::from_utf8_lossy(&text).to_string();
            let table: Vec<(String, u16)> = text
                .lines()
                .map(|l| {
                    let mut it = l.split(' ');
                    (it.next().unwrap_or("").to_string(), it.next().and_then(|p| p.parse().ok()).unwrap_or(0))
                })
                .collect();
            links[0] = Some(s);
            // Connect to every lower rank (>0), then accept every higher one.
            for (peer, (ip, port)) in table.iter().enumerate().take(rank).skip(1) {
                let a: SocketAddr =
                    format!("{ip}:{port}").parse().map_err(|e| rerr(format!("rank {peer} address: {e}")))?;
                let mut c = connect_until(a, deadline)?;
                write_all(&mut c, &(rank as u32).to_le_bytes(), master)?;
                links[peer] = Some(c);
            }
            for _ in rank + 1..size {
                let mut c = accept_until(&own, deadline, master)?;
                c.set_read_timeout(Some(timeout)).map_err(|e| rerr(e.to_string()))?;
                let peer = read_u32(&mut c, master)? as usize;
                if peer <= rank || peer >= size || links[peer].is_some() {
                    return Err(rerr(format!("unexpected connection from rank {peer}")));
                }
                links[peer] = Some(c);
            }
        }
        let mut out = Vec::with_capacity(size);
        for s in links {
            out.push(match s {
                Some(s) => {
                    s.set_read_timeout(Some(timeout)).map_err(|e| rerr(e.to_string()))?;
                    let _ = s.set_nodelay(true);
                    Some(Mutex::new(s))
                }
                None => None,
            });
        }
        Ok(TcpComm {
            links: Arc::new(Links { rank, links: out, timeout }),
            members: (0..size).collect(),
            me: rank,
            group: 0,
            seq: AtomicU64::new(0),
            splits: AtomicU64::new(0),
        })
    }

    fn next(&self) -> u64 {
        self.seq.fetch_add(1, Ordering::Relaxed)
    }

    /// Gather every member's bytes at the root (group rank 0); `None` elsewhere.
    fn gather_root(&self, mine: Vec<u8>, seq: u64) -> Result<Option<Vec<Vec<u8>>>> {
        if self.me == 0 {
            let mut all = vec![mine];
            for &g in &self.members[1..] {
                all.push(self.links.recv(g, self.group, seq)?);
            }
            Ok(Some(all))
        } else {
            self.links.send(self.members[0], self.group, seq, &mine)?;
            Ok(None)
        }
    }
}

impl Communicator for TcpComm {
    fn rank(&self) -> usize {
        self.me
    }
    fn size(&self) -> usize {
        self.members.len()
    }

    fn all_reduce(&self, x: &mut [f32], op: ReduceOp) -> Result<()> {
        if self.size() == 1 {
            return Ok(());
        }
        let seq = self.next();
        match self.gather_root(f32_bytes(x), seq)? {
            Some(all) => {
                let mut tmp = vec![0f32; x.len()];
                for (i, b) in all.iter().enumerate().skip(1) {
                    bytes_f32(b, &mut tmp, self.members[i])?;
                    op.apply(x, &tmp);
                }
                let out = f32_bytes(x);
                for &g in &self.members[1..] {
                    self.links.send(g, self.group, seq, &out)?;
                }
            }
            None => {
                let b = self.links.recv(self.members[0], self.group, seq)?;
                bytes_f32(&b, x, self.members[0])?;
            }
        }
        Ok(())
    }

    fn all_gather(&self, x: &[f32], out: &mut [f32]) -> Result<()> {
        check_gather("all_gather", self.size(), x.len(), out.len())?;
        if self.size() == 1 {
            out.copy_from_slice(x);
            return Ok(());
        }
        let seq = self.next();
        match self.gather_root(f32_bytes(x), seq)? {
            Some(all) => {
                let joined: Vec<u8> = all.concat();
                bytes_f32(&joined, out, self.members[0])?;
                for &g in &self.members[1..] {
                    self.links.send(g, self.group, seq, &joined)?;
                }
            }
            None => {
                let b = self.links.recv(self.members[0], self.group, seq)?;
                bytes_f32(&b, out, self.members[0])?;
            }
        }
        Ok(())
    }

    fn reduce_scatter(&self, x: &[f32], out: &mut [f32]) -> Result<()> {
        check_gather("reduce_scatter", self.size(), out.len(), x.len())?;
        if self.size() == 1 {
            out.copy_from_slice(x);
            return Ok(());
        }
        let seq = self.next();
        let part = out.len();
        match self.gather_root(f32_bytes(x), seq)? {
            Some(all) => {
                let mut acc = x.to_vec();
                let mut tmp = vec![0f32; x.len()];
                for (i, b) in all.iter().enumerate().skip(1) {
                    bytes_f32(b, &mut tmp, self.members[i])?;
                    ReduceOp::Sum.apply(&mut acc, &tmp);
                }
                out.copy_from_slice(&acc[..part]);
                for (i, &g) in self.members.iter().enumerate().skip(1) {
                    self.links.send(g, self.group, seq, &f32_bytes(&acc[i * part..(i + 1) * part]))?;
                }
            }
            None => {
                let b = self.links.recv(self.members[0], self.group, seq)?;
                bytes_f32(&b, out, self.members[0])?;
            }
        }
        Ok(())
    }

    fn broadcast(&self, x: &mut [f32], root: usize) -> Result<()> {
        let mut b = f32_bytes(x);
        self.broadcast_bytes(&mut b, root)?;
        let src = self.members.get(root).copied().unwrap_or(0);
        bytes_f32(&b, x, src)
    }

    fn broadcast_bytes(&self, x: &mut Vec<u8>, root: usize) -> Result<()> {
        if root >= self.size() {
            return Err(DistError::Collective { op: "broadcast", detail: format!("root {root} of {}", self.size()) });
        }
        if self.size() == 1 {
            return Ok(());
        }
        let seq = self.next();
        if self.me == root {
            for (i, &g) in self.members.iter().enumerate() {
                if i != root {
                    self.links.send(g, self.group, seq, x)?;
                }
            }
        } else {
            *x = self.links.recv(self.members[root], self.group, seq)?;
        }
        Ok(())
    }

    fn split(&self, color: usize, key: usize) -> Result<Arc<dyn Communicator>> {
        let members = split_members(self, color, key)?;
        let me = members.iter().position(|&r| r == self.me).ok_or_else(|| DistError::Collective {
            op: "split",
            detail: "this rank is missing from its own group".into(),
        })?;
        let n = self.splits.fetch_add(1, Ordering::Relaxed);
        // Every member derives the same id from the parent's id, the split number and the
        // color; distinct groups sharing a socket then never accept each other's messages.
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for v in [self.group, n, color as u64] {
            h = (h ^ v).wrapping_mul(0x1000_0000_01b3);
        }
        Ok(Arc::new(TcpComm {
            links: self.links.clone(),
            members: members.iter().map(|&i| self.members[i]).collect(),
            me,
            group: h,
            seq: AtomicU64::new(0),
            splits: AtomicU64::new(0),
        }))
    }

    fn describe(&self) -> String {
        format!("tcp {}/{}", self.me, self.members.len())
    }
}
