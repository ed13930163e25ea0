//! What reaches carve's enclave code from other local users and their files: lines on an
//! enclave process's control socket (mode 0766), launch requests, allocator YAML, CPU lists and
//! memory sizes. None may panic or hang; a request that parses must round-trip.
#![no_main]

use carve_enclave::args::parse_memory;
use carve_enclave::pool::{parse_cpu_list, AllocatorConfig};
use carve_enclave::protocol::{receive, send, LaunchEvent, LaunchRequest, Reply, Request};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut lines = std::io::BufReader::new(data);
    while let Ok(Some(request)) = receive::<Request>(&mut lines) {
        let mut again = Vec::new();
        send(&mut again, &request).unwrap();
        let parsed: Request = receive(&mut std::io::BufReader::new(&again[..])).unwrap().unwrap();
        assert_eq!(format!("{request:?}"), format!("{parsed:?}"));
    }
    let _ = receive::<LaunchRequest>(&mut std::io::BufReader::new(data));
    let _ = receive::<LaunchEvent>(&mut std::io::BufReader::new(data));
    let _ = receive::<Reply>(&mut std::io::BufReader::new(data));
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = serde_yaml_ng::from_str::<AllocatorConfig>(text);
        if let Ok(cpus) = parse_cpu_list(text) {
            assert!(cpus.windows(2).all(|w| w[0] < w[1]), "sorted and unique");
        }
        let _ = parse_memory(text);
    }
});
