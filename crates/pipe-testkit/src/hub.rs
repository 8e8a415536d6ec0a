//! A loopback emulation of the Hugging Face Hub's write API, for push tests: repository and
//! branch creation, the revision listing (with blob ids and LFS digests), `preupload`, the LFS
//! batch API (basic and multipart transfers, verify) with its objects on a *second* origin (as
//! the Hub hands out storage URLs of another host), NDJSON commits, and `resolve` downloads of
//! what was committed. Writes need `Authorization: Bearer TOKEN`. Every request is recorded
//! with its origin, so tests can check where the token went. It listens on 127.0.0.1 only.

use std::collections::BTreeMap;
use std::io::Read;
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use base64::Engine as _;
use serde_json::{json, Value};
use sha2::Digest as _;

/// One request as the emulator saw it.
#[derive(Debug, Clone)]
pub struct HubRequest {
    /// `hub` or `storage`: which of the two listeners it reached.
    pub origin: &'static str,
    pub method: String,
    pub path: String,
    pub auth: Option<String>,
    pub body_len: usize,
}

/// One commit of a branch: the files it holds.
#[derive(Debug, Clone, Default)]
pub struct Commit {
    pub oid: String,
    pub summary: String,
    /// Path → bytes.
    pub files: BTreeMap<String, Vec<u8>>,
    /// Paths held through LFS.
    pub lfs: std::collections::BTreeSet<String>,
}

#[derive(Default)]
pub struct HubState {
    /// Repository (`ORG/REPO`) → branch → commits, oldest first.
    pub repos: BTreeMap<String, BTreeMap<String, Vec<Commit>>>,
    /// sha256 → bytes.
    pub objects: BTreeMap<String, Vec<u8>>,
    /// Multipart uploads in progress: (sha256, part) → bytes.
    parts: BTreeMap<(String, u32), Vec<u8>>,
    pub requests: Vec<HubRequest>,
    /// Requests whose path starts with this answer 500 this many more times.
    pub failures: BTreeMap<String, usize>,
    /// LFS objects of at least this many bytes go in parts of this size.
    pub multipart: Option<u64>,
    token: String,
    storage: String,
}

pub struct HubEmulator {
    pub endpoint: String,
    pub state: Arc<Mutex<HubState>>,
    stop: Arc<AtomicBool>,
    handles: Vec<JoinHandle<()>>,
}

impl HubEmulator {
    /// Starts the Hub and its LFS storage on two ports of 127.0.0.1; writes need `token`.
    pub fn start(token: &str) -> Self {
        let hub = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1");
        let storage = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1");
        let endpoint = format!("http://{}", hub.local_addr().expect("address"));
        let state = Arc::new(Mutex::new(HubState {
            token: token.to_string(),
            storage: format!("http://{}", storage.local_addr().expect("address")),
            ..Default::default()
        }));
        let stop = Arc::new(AtomicBool::new(false));
        let handles = [(hub, "hub"), (storage, "storage")]
            .into_iter()
            .map(|(listener, origin)| {
                listener.set_nonblocking(true).expect("nonblocking");
                let (st, halt) = (state.clone(), stop.clone());
                std::thread::spawn(move || {
                    while !halt.load(Ordering::SeqCst) {
                        match listener.accept() {
                            Ok((conn, _)) => {
                                let st = st.clone();
                                std::thread::spawn(move || serve(conn, origin, &st));
                            }
                            Err(_) => std::thread::sleep(Duration::from_millis(5)),
                        }
                    }
                })
            })
            .collect();
        HubEmulator {
            endpoint,
            state,
            stop,
            handles,
        }
    }

    /// The commits of `repo`'s `branch`, oldest first (empty if there is none).
    pub fn commits(&self, repo: &str, branch: &str) -> Vec<Commit> {
        let st = self.state.lock().unwrap();
        st.repos
            .get(repo)
            .and_then(|b| b.get(branch))
            .cloned()
            .unwrap_or_default()
    }

    pub fn requests(&self) -> Vec<HubRequest> {
        self.state.lock().unwrap().requests.clone()
    }

    /// The next `times` requests whose path starts with `prefix` fail with HTTP 500.
    pub fn fail_next(&self, prefix: &str, times: usize) {
        self.state
            .lock()
            .unwrap()
            .failures
            .insert(prefix.to_string(), times);
    }

    /// LFS objects of `bytes` or more are uploaded in parts of `bytes`.
    pub fn multipart_from(&self, bytes: u64) {
        self.state.lock().unwrap().multipart = Some(bytes);
    }
}

impl Drop for HubEmulator {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        for h in self.handles.drain(..) {
            let _ = h.join();
        }
    }
}

fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(sha2::Sha256::digest(bytes))
}

fn git_blob(bytes: &[u8]) -> String {
    use sha1::Digest as _;
    let mut h = sha1::Sha1::new();
    h.update(format!("blob {}\0", bytes.len()).as_bytes());
    h.update(bytes);
    hex::encode(h.finalize())
}

/// One HTTP request: its head and body.
struct Request {
    method: String,
    path: String,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

/// Reads one request (its body by Content-Length).
fn read_request(conn: &mut TcpStream) -> Option<Request> {
    let head = crate::server::read_head(conn)?;
    let len = head
        .headers
        .iter()
        .find(|(k, _)| k == "content-length")
        .and_then(|(_, v)| v.parse::<usize>().ok())
        .unwrap_or(0);
    let mut body = vec![0u8; len];
    conn.read_exact(&mut body).ok()?;
    Some(Request {
        method: head.method,
        path: head.path,
        headers: head.headers,
        body,
    })
}

fn respond(conn: &mut TcpStream, status: &str, extra: &[String], body: &[u8]) {
    crate::server::respond(conn, status, extra, body, body.len())
}

fn serve(mut conn: TcpStream, origin: &'static str, state: &Mutex<HubState>) {
    let _ = conn.set_nonblocking(false);
    let _ = conn.set_read_timeout(Some(Duration::from_secs(30)));
    let Some(Request {
        method,
        path,
        headers,
        body,
    }) = read_request(&mut conn)
    else {
        return;
    };
    let auth = headers
        .iter()
        .find(|(k, _)| k == "authorization")
        .map(|(_, v)| v.clone());
    let mut st = state.lock().unwrap();
    st.requests.push(HubRequest {
        origin,
        method: method.clone(),
        path: path.clone(),
        auth: auth.clone(),
        body_len: body.len(),
    });
    let failing = st
        .failures
        .iter_mut()
        .find(|(p, n)| path.starts_with(p.as_str()) && **n > 0);
    if let Some((_, n)) = failing {
        *n -= 1;
        drop(st);
        respond(
            &mut conn,
            "500 Internal Server Error",
            &[],
            b"injected failure",
        );
        return;
    }
    let authorised = auth.as_deref() == Some(&format!("Bearer {}", st.token));
    let (status, extra, answer) = route(&mut st, origin, &method, &path, &body, authorised);
    drop(st);
    respond(&mut conn, status, &extra, &answer);
}

type Answer = (&'static str, Vec<String>, Vec<u8>);

fn ok_json(v: Value) -> Answer {
    ("200 OK", Vec::new(), serde_json::to_vec(&v).unwrap())
}

fn status(s: &'static str) -> Answer {
    (s, Vec::new(), s.as_bytes().to_vec())
}

fn route(
    st: &mut HubState,
    origin: &str,
    method: &str,
    path: &str,
    body: &[u8],
    authorised: bool,
) -> Answer {
    if origin == "storage" {
        return storage(st, method, path, body);
    }
    let (route_path, query) = path.split_once('?').unwrap_or((path, ""));
    let segs: Vec<&str> = route_path.trim_start_matches('/').split('/').collect();
    if method != "GET" && !authorised {
        return status("401 Unauthorized");
    }
    match (method, segs.as_slice()) {
        ("POST", ["api", "repos", "create"]) => {
            let v: Value = serde_json::from_slice(body).unwrap_or_default();
            let repo = format!(
                "{}/{}",
                v["organization"].as_str().unwrap_or_default(),
                v["name"].as_str().unwrap_or_default()
            );
            if st.repos.contains_key(&repo) {
                return status("409 Conflict");
            }
            let attributes = b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n".to_vec();
            let first = Commit {
                oid: commit_oid(&repo, 0),
                summary: "initial commit".into(),
                files: [(".gitattributes".to_string(), attributes)].into(),
                lfs: Default::default(),
            };
            st.repos
                .insert(repo.clone(), [("main".to_string(), vec![first])].into());
            ok_json(json!({"url": format!("/{repo}")}))
        }
        ("GET", ["api", "models", org, name, "revision", rev]) if query.contains("blobs=true") => {
            let repo = format!("{org}/{name}");
            let Some(head) = head(st, &repo, &decode(rev)) else {
                return status("404 Not Found");
            };
            let siblings: Vec<Value> = head
                .files
                .iter()
                .map(|(p, b)| {
                    if head.lfs.contains(p) {
                        json!({"rfilename": p, "size": b.len(), "blobId": "0".repeat(40),
                               "lfs": {"sha256": sha256_hex(b), "size": b.len(), "pointerSize": 134}})
                    } else {
                        json!({"rfilename": p, "size": b.len(), "blobId": git_blob(b)})
                    }
                })
                .collect();
            ok_json(json!({"id": repo, "sha": head.oid, "siblings": siblings}))
        }
        ("GET", [org, name, "resolve", rev, file @ ..]) => {
            let repo = format!("{org}/{name}");
            let Some(head) = head(st, &repo, &decode(rev)) else {
                return status("404 Not Found");
            };
            match head.files.get(&file.join("/")) {
                Some(b) => (
                    "200 OK",
                    vec![format!("ETag: \"{}\"", sha256_hex(b))],
                    b.clone(),
                ),
                None => status("404 Not Found"),
            }
        }
        ("POST", ["api", "models", org, name, "branch", branch]) => {
            let repo = format!("{org}/{name}");
            let branch = decode(branch);
            let Some(branches) = st.repos.get_mut(&repo) else {
                return status("404 Not Found");
            };
            if branches.contains_key(&branch) {
                return status("409 Conflict");
            }
            let main = branches["main"].clone();
            branches.insert(branch, main);
            ok_json(json!({}))
        }
        ("POST", ["api", "models", _, _, "preupload", _]) => {
            let v: Value = serde_json::from_slice(body).unwrap_or_default();
            let files: Vec<Value> = v["files"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|f| {
                    let p = f["path"].as_str().unwrap_or_default();
                    let lfs = p.ends_with(".safetensors")
                        || p.ends_with(".gguf")
                        || f["size"].as_u64().unwrap_or(0) >= 10 << 20;
                    json!({"path": p, "uploadMode": if lfs { "lfs" } else { "regular" }, "shouldIgnore": false})
                })
                .collect();
            ok_json(json!({"files": files}))
        }
        ("POST", [org, name_git, "info", "lfs", "objects", "batch"]) => {
            let repo = format!("{org}/{}", name_git.trim_end_matches(".git"));
            if !st.repos.contains_key(&repo) {
                return status("404 Not Found");
            }
            let v: Value = serde_json::from_slice(body).unwrap_or_default();
            let storage = st.storage.clone();
            let objects: Vec<Value> = v["objects"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|o| {
                    let oid = o["oid"].as_str().unwrap_or_default().to_string();
                    let size = o["size"].as_u64().unwrap_or(0);
                    if st.objects.contains_key(&oid) {
                        return json!({"oid": oid, "size": size});
                    }
                    let verify = json!({"href": format!("{storage}/verify"), "header": {}});
                    match st.multipart.filter(|m| size >= *m) {
                        Some(chunk) => {
                            let mut header = serde_json::Map::new();
                            header.insert("chunk_size".into(), json!(chunk.to_string()));
                            for n in 1..=size.div_ceil(chunk) {
                                header.insert(
                                    format!("{n:05}"),
                                    json!(format!("{storage}/part/{oid}/{n}")),
                                );
                            }
                            json!({"oid": oid, "size": size, "actions": {
                                "upload": {"href": format!("{storage}/complete/{oid}"), "header": header},
                                "verify": verify}})
                        }
                        None => json!({"oid": oid, "size": size, "actions": {
                            "upload": {"href": format!("{storage}/object/{oid}"), "header": {}},
                            "verify": verify}}),
                    }
                })
                .collect();
            ok_json(json!({"transfer": "basic", "objects": objects}))
        }
        ("POST", ["api", "models", org, name, "commit", rev]) => {
            let repo = format!("{org}/{name}");
            let branch = decode(rev);
            let Some(mut next) = head(st, &repo, &branch).cloned() else {
                return status("404 Not Found");
            };
            for line in body.split(|b| *b == b'\n').filter(|l| !l.is_empty()) {
                let Ok(l) = serde_json::from_slice::<Value>(line) else {
                    return status("400 Bad Request");
                };
                let v = &l["value"];
                let p = v["path"].as_str().unwrap_or_default().to_string();
                match l["key"].as_str() {
                    Some("header") => {
                        next.summary = v["summary"].as_str().unwrap_or_default().into()
                    }
                    Some("file") => {
                        let Ok(bytes) = base64::engine::general_purpose::STANDARD
                            .decode(v["content"].as_str().unwrap_or_default())
                        else {
                            return status("400 Bad Request");
                        };
                        next.lfs.remove(&p);
                        next.files.insert(p, bytes);
                    }
                    Some("lfsFile") => {
                        let oid = v["oid"].as_str().unwrap_or_default();
                        let Some(bytes) = st.objects.get(oid) else {
                            return (
                                "422 Unprocessable Entity",
                                Vec::new(),
                                format!("LFS object {oid} was never uploaded").into_bytes(),
                            );
                        };
                        next.lfs.insert(p.clone());
                        next.files.insert(p, bytes.clone());
                    }
                    _ => return status("400 Bad Request"),
                }
            }
            let commits = st
                .repos
                .get_mut(&repo)
                .and_then(|b| b.get_mut(&branch))
                .expect("head found");
            next.oid = commit_oid(&repo, commits.len());
            let oid = next.oid.clone();
            commits.push(next);
            ok_json(json!({"commitOid": oid, "commitUrl": format!("/{repo}/commit/{oid}")}))
        }
        _ => status("404 Not Found"),
    }
}

/// The LFS storage origin: objects whole or in parts, completion and verification.
fn storage(st: &mut HubState, method: &str, path: &str, body: &[u8]) -> Answer {
    let segs: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    match (method, segs.as_slice()) {
        ("PUT", ["object", oid]) => {
            if sha256_hex(body) != *oid {
                return status("400 Bad Request");
            }
            st.objects.insert(oid.to_string(), body.to_vec());
            status("200 OK")
        }
        ("PUT", ["part", oid, n]) => {
            let Ok(n) = n.parse::<u32>() else {
                return status("400 Bad Request");
            };
            let etag = format!("\"{}\"", blake3::hash(body).to_hex());
            st.parts.insert((oid.to_string(), n), body.to_vec());
            ("200 OK", vec![format!("ETag: {etag}")], Vec::new())
        }
        ("POST", ["complete", oid]) => {
            let v: Value = serde_json::from_slice(body).unwrap_or_default();
            let mut whole = Vec::new();
            for part in v["parts"].as_array().into_iter().flatten() {
                let n = part["partNumber"].as_u64().unwrap_or(0) as u32;
                let Some(bytes) = st.parts.get(&(oid.to_string(), n)) else {
                    return status("400 Bad Request");
                };
                let etag = format!("\"{}\"", blake3::hash(bytes).to_hex());
                if part["etag"].as_str() != Some(&etag) {
                    return status("400 Bad Request");
                }
                whole.extend_from_slice(bytes);
            }
            if sha256_hex(&whole) != *oid {
                return status("400 Bad Request");
            }
            st.objects.insert(oid.to_string(), whole);
            status("200 OK")
        }
        ("POST", ["verify"]) => {
            let v: Value = serde_json::from_slice(body).unwrap_or_default();
            let oid = v["oid"].as_str().unwrap_or_default();
            match st.objects.get(oid) {
                Some(b) if Some(b.len() as u64) == v["size"].as_u64() => status("200 OK"),
                _ => status("404 Not Found"),
            }
        }
        _ => status("404 Not Found"),
    }
}

/// The head of branch `rev`, or the commit whose id is `rev`.
fn head<'s>(st: &'s HubState, repo: &str, rev: &str) -> Option<&'s Commit> {
    let branches = st.repos.get(repo)?;
    branches
        .get(rev)
        .and_then(|c| c.last())
        .or_else(|| branches.values().flatten().find(|c| c.oid == rev))
}

fn commit_oid(repo: &str, n: usize) -> String {
    hex::encode(&blake3::hash(format!("{repo}#{n}").as_bytes()).as_bytes()[..20])
}

/// Undoes percent-encoding (a branch `a/b` arrives as `a%2Fb`).
fn decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' && i + 2 < bytes.len() {
            if let Ok(b) = u8::from_str_radix(&s[i + 1..i + 3], 16) {
                out.push(b);
                i += 3;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}
