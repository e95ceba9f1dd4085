//! Benchmark driver for bench/store_forward.sh. Subcommands print one JSON line each.
//!
//! - `receiver`: the recording receiver (cloud stand-in), until killed.
//! - `ingest`: N keep-alive clients, one request in flight each, for S seconds, against
//!   misaki's ingest endpoint (HTTP/1.1 POST, wait for 202), NATS JetStream (PUB with a
//!   reply inbox, wait for the stream's ack) or MQTT 3.1.1 (QoS 1 PUBLISH, wait for
//!   PUBACK). The NATS and MQTT clients are minimal protocol implementations (~50 lines
//!   each) instead of async-nats/rumqttc, to keep the dependency tree and build time small
//!   and to make the three clients do the same thing: one connection per client, one
//!   acknowledged message in flight.
//! - `kill-rounds`: kill -9 of saf-daemon under load, R rounds, then a restart; counts
//!   lost and duplicated messages at the receiver.
//! - `drain`: fill the queue while the uplink is down, flip it up, time the first delivery
//!   and the drain.
//! - `zstd`: ratio and speed on telemetry-like JSON at the per-uplink levels.

use std::{
    collections::HashSet,
    process::Stdio,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use misaki_saf::testkit::{Receiver, telemetry_json};
use rand::Rng;
use serde_json::json;
use tokio::{
    io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader},
    net::TcpStream,
};

type Res<T> = Result<T, Box<dyn std::error::Error + Send + Sync>>;

fn arg(args: &[String], name: &str, default: &str) -> String {
    args.windows(2)
        .find(|w| w[0] == name)
        .map_or_else(|| default.to_string(), |w| w[1].clone())
}

fn main() -> Res<()> {
    let args: Vec<String> = std::env::args().collect();
    let cmd = args.get(1).cloned().unwrap_or_default();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(arg(&args, "--threads", "2").parse()?)
        .enable_all()
        .build()?;
    rt.block_on(async move {
        match cmd.as_str() {
            "receiver" => receiver(&args).await,
            "ingest" => ingest(&args).await,
            "kill-rounds" => kill_rounds(&args).await,
            "drain" => drain(&args).await,
            "zstd" => zstd_bench(),
            _ => Err("usage: saf_bench receiver|ingest|kill-rounds|drain|zstd [--flags]".into()),
        }
    })
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

async fn receiver(args: &[String]) -> Res<()> {
    let r = Receiver::start(arg(args, "--listen", "127.0.0.1:0").parse()?, false).await?;
    println!("receiver {}", r.addr());
    std::future::pending::<()>().await;
    Ok(())
}

// ---------------------------------------------------------------- ingest throughput

async fn ingest(args: &[String]) -> Res<()> {
    let target = arg(args, "--target", "misaki");
    let addr = arg(args, "--addr", "127.0.0.1:9471");
    let clients: usize = arg(args, "--clients", "64").parse()?;
    let secs: f64 = arg(args, "--secs", "5").parse()?;
    let size: usize = arg(args, "--body", "1024").parse()?;
    let body = Bytes::from(telemetry_json(size, 1)[..size].to_vec());
    if target == "nats" {
        nats_create_stream(&addr).await?;
    }
    if target == "mqtt" {
        mqtt_durable_subscriber(&addr).await?;
    }
    let warmup = Duration::from_millis(500);
    let start = Instant::now();
    let measure_from = start + warmup;
    let end = measure_from + Duration::from_secs_f64(secs);
    let mut tasks = Vec::new();
    for c in 0..clients {
        let (addr, body, target) = (addr.clone(), body.clone(), target.clone());
        tasks.push(tokio::spawn(async move {
            let r = match target.as_str() {
                "misaki" => misaki_client(&addr, body, measure_from, end).await,
                "nats" => nats_client(c, &addr, body, measure_from, end).await,
                "mqtt" => mqtt_client(c, &addr, body, measure_from, end).await,
                _ => Err("--target misaki|nats|mqtt".into()),
            };
            r.map_err(|e| e.to_string())
        }));
    }
    let mut lat = Vec::new();
    let mut errors = 0u64;
    for t in tasks {
        match t.await? {
            Ok(l) => lat.extend(l),
            Err(e) => {
                errors += 1;
                eprintln!("client error: {e}");
            }
        }
    }
    lat.sort_unstable();
    let pct = |p: f64| {
        lat.get(((lat.len() as f64 * p) as usize).min(lat.len().saturating_sub(1)))
            .copied()
            .unwrap_or(0)
    };
    println!(
        "{}",
        json!({
            "target": target, "clients": clients, "body": size, "secs": secs,
            "ok": lat.len(), "rps": lat.len() as f64 / secs,
            "p50_us": pct(0.50), "p99_us": pct(0.99), "max_us": lat.last().copied().unwrap_or(0),
            "client_errors": errors,
        })
    );
    Ok(())
}

/// Latencies (µs) of acknowledged requests sent in [measure_from, end).
async fn misaki_client(
    addr: &str,
    body: Bytes,
    measure_from: Instant,
    end: Instant,
) -> Res<Vec<u32>> {
    let stream = TcpStream::connect(addr).await?;
    stream.set_nodelay(true)?;
    let (mut tx, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(conn);
    let mut lat = Vec::new();
    loop {
        let t = Instant::now();
        if t >= end {
            return Ok(lat);
        }
        let req = http::Request::post("/telemetry/bench")
            .header("host", "127.0.0.1")
            .header("content-type", "application/json")
            .body(Full::new(body.clone()))?;
        tx.ready().await?;
        let resp = tx.send_request(req).await?;
        let status = resp.status();
        resp.into_body().collect().await?;
        if status != http::StatusCode::ACCEPTED {
            return Err(format!("misaki answered {status}").into());
        }
        if t >= measure_from {
            lat.push(t.elapsed().as_micros() as u32);
        }
    }
}

// ---------------------------------------------------------------- NATS JetStream

async fn nats_connect(
    addr: &str,
) -> Res<(
    BufReader<tokio::net::tcp::OwnedReadHalf>,
    tokio::net::tcp::OwnedWriteHalf,
)> {
    let s = TcpStream::connect(addr).await?;
    s.set_nodelay(true)?;
    let (r, mut w) = s.into_split();
    let mut r = BufReader::new(r);
    let mut line = String::new();
    r.read_line(&mut line).await?; // INFO
    w.write_all(b"CONNECT {\"verbose\":false,\"pedantic\":false,\"headers\":false}\r\nPING\r\n")
        .await?;
    loop {
        line.clear();
        r.read_line(&mut line).await?;
        if line.starts_with("PONG") {
            return Ok((r, w));
        }
        if line.starts_with("-ERR") {
            return Err(line.into());
        }
    }
}

/// Read until the next MSG and return its payload (answering server PINGs).
async fn nats_next_msg(
    r: &mut BufReader<tokio::net::tcp::OwnedReadHalf>,
    w: &mut tokio::net::tcp::OwnedWriteHalf,
) -> Res<Vec<u8>> {
    let mut line = String::new();
    loop {
        line.clear();
        if r.read_line(&mut line).await? == 0 {
            return Err("nats closed the connection".into());
        }
        if line.starts_with("PING") {
            w.write_all(b"PONG\r\n").await?;
        } else if line.starts_with("-ERR") {
            return Err(line.into());
        } else if line.starts_with("MSG ") {
            let n: usize = line.split_whitespace().last().ok_or("bad MSG")?.parse()?;
            let mut payload = vec![0; n + 2];
            r.read_exact(&mut payload).await?;
            payload.truncate(n);
            return Ok(payload);
        }
    }
}

async fn nats_create_stream(addr: &str) -> Res<()> {
    let (mut r, mut w) = nats_connect(addr).await?;
    let cfg = br#"{"name":"BENCH","subjects":["bench.>"],"storage":"file","retention":"limits","discard":"old","num_replicas":1}"#;
    w.write_all(
        format!(
            "SUB _INBOX.setup 1\r\nPUB $JS.API.STREAM.CREATE.BENCH _INBOX.setup {}\r\n",
            cfg.len()
        )
        .as_bytes(),
    )
    .await?;
    w.write_all(cfg).await?;
    w.write_all(b"\r\n").await?;
    let reply = nats_next_msg(&mut r, &mut w).await?;
    let text = String::from_utf8_lossy(&reply);
    if text.contains("\"error\"") && !text.contains("already in use") {
        return Err(format!("stream create: {text}").into());
    }
    Ok(())
}

async fn nats_client(
    id: usize,
    addr: &str,
    body: Bytes,
    measure_from: Instant,
    end: Instant,
) -> Res<Vec<u32>> {
    let (mut r, mut w) = nats_connect(addr).await?;
    w.write_all(format!("SUB _INBOX.c{id}.* 1\r\n").as_bytes())
        .await?;
    let mut lat = Vec::new();
    let mut frame = Vec::with_capacity(body.len() + 64);
    for seq in 0u64.. {
        let t = Instant::now();
        if t >= end {
            break;
        }
        frame.clear();
        frame.extend_from_slice(
            format!("PUB bench.c{id} _INBOX.c{id}.{seq} {}\r\n", body.len()).as_bytes(),
        );
        frame.extend_from_slice(&body);
        frame.extend_from_slice(b"\r\n");
        w.write_all(&frame).await?;
        let ack = nats_next_msg(&mut r, &mut w).await?;
        if ack.windows(7).any(|x| x == b"\"error\"") {
            return Err(format!("publish not acked: {}", String::from_utf8_lossy(&ack)).into());
        }
        if t >= measure_from {
            lat.push(t.elapsed().as_micros() as u32);
        }
    }
    Ok(lat)
}

// ---------------------------------------------------------------- MQTT 3.1.1

fn mqtt_packet(first: u8, body: &[u8]) -> Vec<u8> {
    let mut out = vec![first];
    let mut len = body.len();
    loop {
        let mut b = (len % 128) as u8;
        len /= 128;
        if len > 0 {
            b |= 0x80;
        }
        out.push(b);
        if len == 0 {
            break;
        }
    }
    out.extend_from_slice(body);
    out
}

fn mqtt_str(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u16).to_be_bytes());
    out.extend_from_slice(s.as_bytes());
}

async fn mqtt_read(s: &mut TcpStream) -> Res<(u8, Vec<u8>)> {
    let first = s.read_u8().await?;
    let (mut len, mut mul) = (0usize, 1usize);
    loop {
        let b = s.read_u8().await?;
        len += usize::from(b & 0x7f) * mul;
        mul *= 128;
        if b & 0x80 == 0 {
            break;
        }
    }
    let mut body = vec![0; len];
    s.read_exact(&mut body).await?;
    Ok((first, body))
}

async fn mqtt_connect(addr: &str, client_id: &str, clean: bool) -> Res<TcpStream> {
    let mut s = TcpStream::connect(addr).await?;
    s.set_nodelay(true)?;
    let mut v = Vec::new();
    mqtt_str(&mut v, "MQTT");
    v.push(4); // protocol level 3.1.1
    v.push(if clean { 0x02 } else { 0x00 });
    v.extend_from_slice(&60u16.to_be_bytes());
    mqtt_str(&mut v, client_id);
    s.write_all(&mqtt_packet(0x10, &v)).await?;
    let (t, b) = mqtt_read(&mut s).await?;
    if t != 0x20 || b.get(1) != Some(&0) {
        return Err(format!("CONNACK refused: {t:#x} {b:?}").into());
    }
    Ok(s)
}

/// A persistent-session QoS 1 subscriber that then goes away: the broker must keep every
/// published message for it (that is what makes mosquitto store them at all).
async fn mqtt_durable_subscriber(addr: &str) -> Res<()> {
    let mut s = mqtt_connect(addr, "bench-sink", false).await?;
    let mut v = 1u16.to_be_bytes().to_vec();
    mqtt_str(&mut v, "bench/#");
    v.push(1);
    s.write_all(&mqtt_packet(0x82, &v)).await?;
    let (t, _) = mqtt_read(&mut s).await?;
    if t != 0x90 {
        return Err("no SUBACK".into());
    }
    s.write_all(&[0xe0, 0]).await?; // DISCONNECT
    Ok(())
}

async fn mqtt_client(
    id: usize,
    addr: &str,
    body: Bytes,
    measure_from: Instant,
    end: Instant,
) -> Res<Vec<u32>> {
    let mut s = mqtt_connect(addr, &format!("bench-pub-{id}"), true).await?;
    let topic = format!("bench/c{id}");
    let mut lat = Vec::new();
    let mut pid: u16 = 0;
    loop {
        let t = Instant::now();
        if t >= end {
            return Ok(lat);
        }
        pid = pid.wrapping_add(1).max(1);
        let mut v = Vec::with_capacity(body.len() + 32);
        mqtt_str(&mut v, &topic);
        v.extend_from_slice(&pid.to_be_bytes());
        v.extend_from_slice(&body);
        s.write_all(&mqtt_packet(0x32, &v)).await?; // PUBLISH, QoS 1
        let (t2, b) = mqtt_read(&mut s).await?;
        if t2 != 0x40 || b != pid.to_be_bytes() {
            return Err(format!("expected PUBACK {pid}, got {t2:#x}").into());
        }
        if t >= measure_from {
            lat.push(t.elapsed().as_micros() as u32);
        }
    }
}

// ---------------------------------------------------------------- kill -9 rounds

async fn start_daemon(
    daemon: &str,
    dir: &str,
    policy: &str,
    cloud: &str,
) -> Res<(tokio::process::Child, String)> {
    let mut child = tokio::process::Command::new(daemon)
        .args(["--queue-dir", dir, "--policy", policy, "--cloud-url", cloud])
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()?;
    let mut lines = BufReader::new(child.stdout.take().ok_or("no stdout")?).lines();
    let line = tokio::time::timeout(Duration::from_secs(30), lines.next_line())
        .await??
        .ok_or("daemon exited")?;
    let ingest = line
        .split_whitespace()
        .find_map(|w| w.strip_prefix("ingest="))
        .ok_or("no ingest=")?
        .to_string();
    Ok((child, ingest))
}

async fn kill_rounds(args: &[String]) -> Res<()> {
    let daemon = arg(args, "--daemon", "target/release/saf-daemon");
    let dir = arg(args, "--dir", "/tmp/saf-kill");
    let policy = arg(args, "--policy", "");
    let rounds: usize = arg(args, "--rounds", "20").parse()?;
    let clients: usize = arg(args, "--clients", "8").parse()?;
    let receiver = Receiver::start("127.0.0.1:0".parse()?, false).await?;
    let cloud = format!("http://{}", receiver.addr());
    let accepted = Arc::new(Mutex::new(Vec::<String>::new()));
    let sent = Arc::new(Mutex::new(HashSet::<String>::new()));
    let body = Bytes::from(telemetry_json(1024, 3)[..1024].to_vec());
    for round in 0..rounds {
        let (mut child, ingest) = start_daemon(&daemon, &dir, &policy, &cloud).await?;
        let stop = Arc::new(AtomicBool::new(false));
        let mut tasks = Vec::new();
        for c in 0..clients {
            let (ingest, stop, accepted, sent, body) = (
                ingest.clone(),
                stop.clone(),
                accepted.clone(),
                sent.clone(),
                body.clone(),
            );
            tasks.push(tokio::spawn(async move {
                let mut seq = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    let Ok(s) = TcpStream::connect(&ingest).await else {
                        tokio::time::sleep(Duration::from_millis(5)).await;
                        continue;
                    };
                    let Ok((mut tx, conn)) =
                        hyper::client::conn::http1::handshake(TokioIo::new(s)).await
                    else {
                        continue;
                    };
                    tokio::spawn(conn);
                    while !stop.load(Ordering::Relaxed) {
                        seq += 1;
                        let key = format!("r{round}-c{c}-{seq}");
                        sent.lock()
                            .unwrap_or_else(std::sync::PoisonError::into_inner)
                            .insert(key.clone());
                        let req = http::Request::post("/telemetry/kill")
                            .header("host", "127.0.0.1")
                            .header("idempotency-key", &key)
                            .body(Full::new(body.clone()))
                            .expect("valid request");
                        if tx.ready().await.is_err() {
                            break;
                        }
                        let Ok(resp) = tx.send_request(req).await else {
                            break;
                        };
                        let status = resp.status();
                        if resp.into_body().collect().await.is_err() {
                            break;
                        }
                        if status == http::StatusCode::ACCEPTED {
                            accepted
                                .lock()
                                .unwrap_or_else(std::sync::PoisonError::into_inner)
                                .push(key);
                        }
                    }
                }
            }));
        }
        let ms = rand::rng().random_range(200..800);
        tokio::time::sleep(Duration::from_millis(ms)).await;
        child.start_kill()?; // SIGKILL
        child.wait().await?;
        tokio::time::sleep(Duration::from_millis(30)).await;
        stop.store(true, Ordering::Relaxed);
        for t in tasks {
            t.await?;
        }
    }
    let (mut child, _) = start_daemon(&daemon, &dir, &policy, &cloud).await?;
    let accepted = accepted
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .clone();
    let start = Instant::now();
    let missing = loop {
        let ok = receiver.ok_keys();
        let missing = accepted.iter().filter(|k| !ok.contains_key(*k)).count();
        if missing == 0 || start.elapsed() > Duration::from_secs(120) {
            break missing;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    let ok = receiver.ok_keys();
    let dups: u64 = ok.values().map(|n| u64::from(n - 1)).sum();
    let unknown = {
        let sent = sent
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        ok.keys().filter(|k| !sent.contains(*k)).count()
    };
    child.start_kill()?;
    child.wait().await?;
    println!(
        "{}",
        json!({
            "rounds": rounds, "accepted": accepted.len(), "lost": missing,
            "delivered_keys": ok.len(), "duplicates": dups,
            "delivered_without_202": ok.len().saturating_sub(accepted.len() - missing),
            "unknown_keys": unknown,
        })
    );
    Ok(())
}

// ---------------------------------------------------------------- drain after uplink up

/// A one-shot request, retried: the stats poll crosses the saturated shaped link, where a
/// connection attempt can fail now and then.
async fn http_get(addr: &str, method: &str, path: &str) -> Res<String> {
    let mut last = None;
    for _ in 0..20 {
        match http_once(addr, method, path).await {
            Ok(s) => return Ok(s),
            Err(e) => last = Some(e),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Err(last.unwrap_or_else(|| "no attempt".into()))
}

async fn http_once(addr: &str, method: &str, path: &str) -> Res<String> {
    let s = TcpStream::connect(addr).await?;
    let (mut tx, conn) = hyper::client::conn::http1::handshake(TokioIo::new(s)).await?;
    tokio::spawn(conn);
    tx.ready().await?;
    let req = http::Request::builder()
        .method(method)
        .uri(path)
        .header("host", addr)
        .body(Full::new(Bytes::new()))?;
    let resp = tx.send_request(req).await?;
    let b = resp.into_body().collect().await?.to_bytes();
    Ok(String::from_utf8_lossy(&b).into_owned())
}

async fn drain(args: &[String]) -> Res<()> {
    let ingest = arg(args, "--ingest", "127.0.0.1:19471");
    let admin = arg(args, "--admin", "127.0.0.1:19472");
    let recv = arg(args, "--receiver", "198.18.10.1:18080");
    let uplink = arg(args, "--uplink", "wifi");
    let n: usize = arg(args, "--messages", "2000").parse()?;
    let size: usize = arg(args, "--body", "4096").parse()?;
    let link_bps: f64 = arg(args, "--link-bits", "8000000").parse()?;
    // Fill the queue while the uplink is down (the daemon starts with it down).
    let s = TcpStream::connect(&ingest).await?;
    let (mut tx, conn) = hyper::client::conn::http1::handshake(TokioIo::new(s)).await?;
    tokio::spawn(conn);
    let mut body_bytes = 0usize;
    for i in 0..n {
        let body = telemetry_json(size, i as u64);
        body_bytes += body.len();
        let req = http::Request::post("/telemetry/drain")
            .header("host", "127.0.0.1")
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(body)))?;
        tx.ready().await?;
        let resp = tx.send_request(req).await?;
        if resp.status() != http::StatusCode::ACCEPTED {
            return Err(format!("fill: {}", resp.status()).into());
        }
        resp.into_body().collect().await?;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let before: serde_json::Value =
        serde_json::from_str(&http_get(&recv, "GET", "/_stats").await?)?;
    if before["ok"].as_u64() != Some(0) {
        return Err(format!("receiver got messages while the uplink was down: {before}").into());
    }
    let t0 = now_ms();
    http_get(&admin, "POST", &format!("/uplinks/{uplink}/up")).await?;
    let start = Instant::now();
    let stats = loop {
        let st: serde_json::Value =
            serde_json::from_str(&http_get(&recv, "GET", "/_stats").await?)?;
        if st["unique"].as_u64().unwrap_or(0) >= n as u64
            || start.elapsed() > Duration::from_secs(300)
        {
            break st;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let first = stats["first_ok_unix_ms"].as_u64().unwrap_or(t0);
    let last = stats["last_ok_unix_ms"].as_u64().unwrap_or(t0);
    let wire = stats["wire_bytes"].as_u64().unwrap_or(0) as f64;
    let secs = ((last - first) as f64 / 1000.0).max(0.001);
    // The drain time counts from the uplink flip; the first delivery's own transfer is in it.
    let total_secs = ((last - t0) as f64 / 1000.0).max(0.001);
    let status: serde_json::Value =
        serde_json::from_str(&http_get(&admin, "GET", "/status").await?)?;
    println!(
        "{}",
        json!({
            "messages": n, "body": size, "delivered": stats["unique"],
            "first_delivery_ms": first.saturating_sub(t0),
            "drain_secs": total_secs,
            "wire_mbit_s": wire * 8.0 / secs / 1e6,
            "link_share": wire * 8.0 / secs / link_bps,
            "payload_mbit_s": body_bytes as f64 * 8.0 / total_secs / 1e6,
            "compression_ratio": status["compression_ratio"],
            "retried": status["totals"]["retried"],
        })
    );
    Ok(())
}

// ---------------------------------------------------------------- zstd

fn zstd_bench() -> Res<()> {
    for size in [1024usize, 16 << 10] {
        let bodies: Vec<Vec<u8>> = (0..(8 << 20) / size)
            .map(|i| telemetry_json(size, i as u64))
            .collect();
        let total: usize = bodies.iter().map(Vec::len).sum();
        for (uplinks, level) in [
            ("wifi/dsrc", 3),
            ("5g", 6),
            ("lte", 9),
            ("3g", 12),
            ("lpwa", 15),
        ] {
            let t = Instant::now();
            let z: Vec<Vec<u8>> = bodies
                .iter()
                .map(|b| zstd::bulk::compress(b, level))
                .collect::<Result<_, _>>()?;
            let ct = t.elapsed().as_secs_f64();
            let t = Instant::now();
            for c in &z {
                std::hint::black_box(zstd::bulk::decompress(c, size * 2)?);
            }
            let dt = t.elapsed().as_secs_f64();
            let zs: usize = z.iter().map(Vec::len).sum();
            println!(
                "{}",
                json!({
                    "body": size, "uplinks": uplinks, "level": level,
                    "ratio": total as f64 / zs as f64,
                    "compress_mb_s": total as f64 / ct / 1e6,
                    "decompress_mb_s": total as f64 / dt / 1e6,
                })
            );
        }
    }
    Ok(())
}
