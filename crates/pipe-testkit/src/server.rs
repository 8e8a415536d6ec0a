//! A real HTTP/1.1 server on 127.0.0.1 for download tests: static files with Range/If-Range
//! support, a route that drops the connection midway, 401/404s, and a Hugging Face Hub-style
//! API. One request per connection, over std's TcpListener: a server library keeps the socket
//! open after a failed body, and the point of the drop route is a connection that really
//! closes halfway. It never listens on anything but the loopback address.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

#[derive(Clone, Debug)]
pub struct Seen {
    pub path: String,
    pub range: Option<String>,
    pub auth: Option<String>,
}

#[derive(Default)]
pub struct State {
    /// path → (body, etag)
    pub files: BTreeMap<String, (Vec<u8>, String)>,
    /// Paths whose next N responses send only half the body and then close the connection.
    pub drops: BTreeMap<String, usize>,
    /// Paths that demand `Authorization: Bearer <token>`.
    pub gated: BTreeMap<String, String>,
    /// Paths answered with `302 Found` to a location.
    pub redirects: BTreeMap<String, String>,
    /// Serve a Range even when If-Range names another version (a broken server or proxy).
    pub ignore_if_range: bool,
    /// Send `Last-Modified` (derived from the content) instead of an ETag.
    pub last_modified_only: bool,
    pub seen: Vec<Seen>,
}

pub struct TestServer {
    pub base: String,
    pub state: Arc<Mutex<State>>,
    stop: Arc<AtomicBool>,
    handle: Option<JoinHandle<()>>,
}

impl TestServer {
    pub fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1");
        let base = format!("http://{}", listener.local_addr().expect("address"));
        listener.set_nonblocking(true).expect("nonblocking");
        let state = Arc::new(Mutex::new(State::default()));
        let stop = Arc::new(AtomicBool::new(false));
        let (st, halt) = (state.clone(), stop.clone());
        let handle = std::thread::spawn(move || {
            while !halt.load(Ordering::SeqCst) {
                match listener.accept() {
                    Ok((conn, _)) => {
                        let st = st.clone();
                        std::thread::spawn(move || serve(conn, &st));
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
        });
        TestServer {
            base,
            state,
            stop,
            handle: Some(handle),
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    pub fn add(&self, path: &str, body: &[u8]) {
        let etag = format!("\"{}\"", blake3::hash(body).to_hex());
        self.state
            .lock()
            .unwrap()
            .files
            .insert(path.to_string(), (body.to_vec(), etag));
    }

    pub fn drop_next(&self, path: &str, times: usize) {
        self.state
            .lock()
            .unwrap()
            .drops
            .insert(path.to_string(), times);
    }

    pub fn gate(&self, path_prefix: &str, token: &str) {
        self.state
            .lock()
            .unwrap()
            .gated
            .insert(path_prefix.to_string(), token.to_string());
    }

    pub fn redirect(&self, path: &str, location: &str) {
        self.state
            .lock()
            .unwrap()
            .redirects
            .insert(path.to_string(), location.to_string());
    }

    pub fn ignore_if_range(&self) {
        self.state.lock().unwrap().ignore_if_range = true;
    }

    pub fn last_modified_only(&self) {
        self.state.lock().unwrap().last_modified_only = true;
    }

    pub fn seen(&self) -> Vec<Seen> {
        self.state.lock().unwrap().seen.clone()
    }

    /// Publishes a Hub-style model repository: the revision API and the resolve route.
    pub fn add_hub_repo(&self, repo: &str, commit: &str, files: &[(&str, &[u8], bool)]) {
        let siblings: Vec<serde_json::Value> = files
            .iter()
            .map(|(name, body, lfs)| {
                if *lfs {
                    serde_json::json!({"rfilename": name, "size": body.len(),
                        "lfs": {"sha256": sha256_hex(body), "size": body.len()}})
                } else {
                    serde_json::json!({"rfilename": name, "size": body.len()})
                }
            })
            .collect();
        let info = serde_json::json!({"id": repo, "sha": commit, "siblings": siblings});
        let body = serde_json::to_vec(&info).unwrap();
        for rev in ["main", commit] {
            self.add(
                &format!("/api/models/{repo}/revision/{rev}?blobs=true"),
                &body,
            );
        }
        for (name, body, _) in files {
            self.add(&format!("/{repo}/resolve/{commit}/{name}"), body);
        }
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

pub fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(bytes))
}

/// A request's first line and headers (names in lower case).
pub(crate) struct Head {
    pub method: String,
    pub path: String,
    pub headers: Vec<(String, String)>,
}

/// Reads a request's head, up to the blank line.
pub(crate) fn read_head(conn: &mut TcpStream) -> Option<Head> {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        match conn.read(&mut byte) {
            Ok(1) => head.push(byte[0]),
            _ => return None,
        }
    }
    let head = String::from_utf8_lossy(&head).into_owned();
    let mut lines = head.split("\r\n");
    let mut first = lines.next()?.split(' ');
    let (method, path) = (first.next()?.to_string(), first.next()?.to_string());
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    Some(Head {
        method,
        path,
        headers,
    })
}

/// Answers with `status`, the `extra` headers and the first `send` bytes of `body` (all of
/// it announced), and closes the connection.
pub(crate) fn respond(
    conn: &mut TcpStream,
    status: &str,
    extra: &[String],
    body: &[u8],
    send: usize,
) {
    let mut out = format!(
        "HTTP/1.1 {status}\r\nContent-Length: {}\r\nConnection: close\r\n",
        body.len()
    );
    for h in extra {
        out.push_str(h);
        out.push_str("\r\n");
    }
    out.push_str("\r\n");
    let _ = conn.write_all(out.as_bytes());
    let _ = conn.write_all(&body[..send]);
    let _ = conn.flush();
    let _ = conn.shutdown(Shutdown::Both);
}

/// Serves one request on `conn` and closes it.
fn serve(mut conn: TcpStream, state: &Mutex<State>) {
    let _ = conn.set_nonblocking(false);
    let _ = conn.set_read_timeout(Some(Duration::from_secs(10)));
    let Some(Head { path, headers, .. }) = read_head(&mut conn) else {
        return;
    };
    let header = |name: &str| {
        headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.clone())
    };
    let (range, if_range, auth) = (header("range"), header("if-range"), header("authorization"));
    let (file, drop, gate, redirect, ignore_if_range, last_modified_only) = {
        let mut st = state.lock().unwrap();
        st.seen.push(Seen {
            path: path.clone(),
            range: range.clone(),
            auth: auth.clone(),
        });
        let drop = match st.drops.get_mut(&path) {
            Some(n) if *n > 0 => {
                *n -= 1;
                true
            }
            _ => false,
        };
        let gate = st
            .gated
            .iter()
            .find(|(p, _)| path.starts_with(p.as_str()))
            .map(|(_, t)| t.clone());
        (
            st.files.get(&path).cloned(),
            drop,
            gate,
            st.redirects.get(&path).cloned(),
            st.ignore_if_range,
            st.last_modified_only,
        )
    };
    if let Some(token) = gate {
        if auth.as_deref() != Some(&format!("Bearer {token}")) {
            respond(&mut conn, "401 Unauthorized", &[], b"unauthorized", 12);
            return;
        }
    }
    if let Some(location) = redirect {
        respond(
            &mut conn,
            "302 Found",
            &[format!("Location: {location}")],
            b"",
            0,
        );
        return;
    }
    let Some((body, etag)) = file else {
        respond(&mut conn, "404 Not Found", &[], b"not found", 9);
        return;
    };
    let start = range
        .as_deref()
        .and_then(|r| r.strip_prefix("bytes="))
        .and_then(|r| r.strip_suffix('-'))
        .and_then(|r| r.parse::<usize>().ok());
    // A stand-in for a modification date that changes with the content.
    let digits = u32::from_str_radix(&etag[1..7], 16).unwrap_or(0);
    let modified = format!(
        "Mon, 01 Jan 2024 {:02}:{:02}:{:02} GMT",
        digits % 24,
        digits / 24 % 60,
        digits / 1440 % 60
    );
    let validator = if last_modified_only {
        modified.clone()
    } else {
        etag.clone()
    };
    let start =
        start.filter(|_| ignore_if_range || if_range.as_deref().is_none_or(|v| v == validator));
    let mut extra = vec![
        if last_modified_only {
            format!("Last-Modified: {modified}")
        } else {
            format!("ETag: {etag}")
        },
        "Accept-Ranges: bytes".to_string(),
    ];
    let (status, slice) = match start {
        Some(s) if s >= body.len() => {
            respond(&mut conn, "416 Range Not Satisfiable", &[], b"", 0);
            return;
        }
        Some(s) => {
            extra.push(format!(
                "Content-Range: bytes {s}-{}/{}",
                body.len() - 1,
                body.len()
            ));
            ("206 Partial Content", body[s..].to_vec())
        }
        None => ("200 OK", body.clone()),
    };
    // A dropped transfer: half the body, then the connection closes.
    let send = if drop { slice.len() / 2 } else { slice.len() };
    respond(&mut conn, status, &extra, &slice, send);
}
