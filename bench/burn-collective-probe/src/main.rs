//! burn-collective 0.21 multi-node all-reduce probe.
//! Modes:  burn-collective-probe orchestrator PORT
//!         burn-collective-probe node RANK    (env: ORCH_PORT=default 30000, DATA_PORT_BASE=default 30100,
//!                                GLOBAL_STRATEGY=ring|tree|centralized, SLEEP_BEFORE_2ND_RANK=<rank>, SLEEP_BEFORE_2ND_SECS=<secs>, N_ITERS=3)
use std::time::Instant;

use burn_collective::{
    AllReduceStrategy, CollectiveConfig, PeerId, ReduceOperation, all_reduce, finish_collective, register,
};
use burn_flex::Flex;
use burn_tensor::{Tensor, TensorPrimitive};

type B = Flex;

fn env_or<T: std::str::FromStr>(k: &str, d: T) -> T {
    std::env::var(k).ok().and_then(|v| v.parse().ok()).unwrap_or(d)
}

fn ts(t0: Instant) -> String {
    format!("[{:7.3}s]", t0.elapsed().as_secs_f64())
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    match args.get(1).map(|s| s.as_str()) {
        Some("orchestrator") => {
            let port: u16 = args[2].parse().unwrap();
            let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap();
            println!("orchestrator: starting on port {port}");
            rt.block_on(burn_collective::start_global_orchestrator(port));
            println!("orchestrator: exited");
        }
        Some("node") => node(args[2].parse().unwrap()),
        _ => eprintln!("usage: burn-collective-probe orchestrator PORT | node RANK"),
    }
}

fn node(rank: u32) {
    let t0 = Instant::now();
    let orch_port: u16 = env_or("ORCH_PORT", 30000);
    let data_port: u16 = env_or::<u16>("DATA_PORT_BASE", 30100) + rank as u16;
    let n_iters: usize = env_or("N_ITERS", 3);
    let sleep_rank: i64 = env_or("SLEEP_BEFORE_2ND_RANK", -1);
    let sleep_secs: u64 = env_or("SLEEP_BEFORE_2ND_SECS", 5);
    let pid = std::process::id();
    println!("{} node {rank} pid {pid} data_port {data_port}", ts(t0));

    let id = PeerId(rank);
    let device = Default::default();
    let config = CollectiveConfig::default()
        .with_num_devices(1)
        .with_num_nodes(2)
        .with_global_address(format!("ws://127.0.0.1:{orch_port}").parse().unwrap())
        .with_node_address(format!("ws://127.0.0.1:{data_port}").parse().unwrap())
        .with_data_service_port(data_port);
    let config = match std::env::var("GLOBAL_STRATEGY").as_deref() {
        Ok("tree") => config.with_global_all_reduce_strategy(AllReduceStrategy::Tree(2)),
        Ok("centralized") => config.with_global_all_reduce_strategy(AllReduceStrategy::Centralized),
        _ => config, // default: Ring
    };

    let t = Instant::now();
    let r = register::<B>(id, device, config);
    println!("{} node {rank} register -> {r:?} ({:.3}s)", ts(t0), t.elapsed().as_secs_f64());
    if r.is_err() {
        std::process::exit(2);
    }

    for i in 0..n_iters {
        if i == 1 && sleep_rank == rank as i64 {
            println!("{} node {rank} sleeping {sleep_secs}s before all_reduce #{i}", ts(t0));
            std::thread::sleep(std::time::Duration::from_secs(sleep_secs));
        }
        let x = Tensor::<B, 1>::full([1024], (rank + 1) as f32, &device);
        let t = Instant::now();
        println!("{} node {rank} all_reduce #{i} start", ts(t0));
        let res = all_reduce::<B>(id, x.into_primitive().tensor(), ReduceOperation::Sum);
        let dt = t.elapsed().as_secs_f64();
        match res {
            Ok(p) => {
                let out = Tensor::<B, 1>::from_primitive(TensorPrimitive::Float(p));
                let v: Vec<f32> = out.to_data().to_vec().unwrap();
                let all_eq = v.iter().all(|&e| e == v[0]);
                println!(
                    "{} node {rank} all_reduce #{i} OK first={} len={} all_equal={all_eq} ({dt:.3}s)",
                    ts(t0), v[0], v.len()
                );
            }
            Err(e) => {
                println!("{} node {rank} all_reduce #{i} ERR {e:?} ({dt:.3}s)", ts(t0));
                std::process::exit(3);
            }
        }
    }
    let t = Instant::now();
    let r = finish_collective::<B>(id);
    println!("{} node {rank} finish_collective -> {r:?} ({:.3}s)", ts(t0), t.elapsed().as_secs_f64());
    println!("{} node {rank} done", ts(t0));
}
