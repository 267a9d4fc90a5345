//! The /metrics endpoint under hostile clients: slow ones cannot hold it.

mod common;

use isthmus_gateway::metrics::{MetricsServer, MAX_SCRAPERS, SCRAPE_DEADLINE};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::Arc;
use std::time::{Duration, Instant};

fn scrape(addr: std::net::SocketAddr) -> String {
    let mut c = TcpStream::connect(addr).expect("connect");
    c.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    c.write_all(b"GET /metrics HTTP/1.1\r\n\r\n")
        .expect("request");
    let mut answer = String::new();
    let _ = c.read_to_string(&mut answer);
    answer
}

/// Found by review: one client sending a byte every 1.9 s held the only serving
/// thread for hours. Now each client has one deadline for its request, and a few
/// are served at once: scrapes get through while tricklers and idlers hang on.
#[test]
fn trickling_and_idle_clients_do_not_hold_the_endpoint() {
    let server = MetricsServer::start(
        "127.0.0.1:0".parse().expect("addr"),
        Arc::new(common::status_document),
    )
    .expect("metrics server");
    let addr = server.local_addr();
    // As many tricklers as there are serving slots, each sending a byte at a time.
    let tricklers: Vec<_> = (0..MAX_SCRAPERS)
        .map(|_| {
            std::thread::spawn(move || {
                let Ok(mut c) = TcpStream::connect(addr) else {
                    return;
                };
                for b in b"GET /metrics HTTP/1.1\r\nX-Slow: yes" {
                    if c.write_all(&[*b]).is_err() {
                        return;
                    }
                    std::thread::sleep(Duration::from_millis(500));
                }
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(300));
    let started = Instant::now();
    let mut answer = scrape(addr);
    // The slots may all be taken for at most one deadline; then scrapes get through.
    while !answer.starts_with("HTTP/1.1 200") && started.elapsed() < SCRAPE_DEADLINE * 3 {
        std::thread::sleep(Duration::from_millis(100));
        answer = scrape(addr);
    }
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer:?}");
    assert!(answer.ends_with("# EOF\n"), "{answer}");
    assert!(
        started.elapsed() <= SCRAPE_DEADLINE + Duration::from_secs(2),
        "a scrape waited {:?}",
        started.elapsed()
    );
    assert!(scrape(addr).starts_with("HTTP/1.1 200"));
    let other = {
        let mut c = TcpStream::connect(addr).expect("connect");
        c.write_all(b"GET /secrets HTTP/1.1\r\n\r\n")
            .expect("request");
        let mut a = String::new();
        let _ = c.read_to_string(&mut a);
        a
    };
    assert!(other.starts_with("HTTP/1.1 404"), "{other}");
    for t in tricklers {
        let _ = t.join();
    }
}

/// Found by the second review: a panic while serving a scrape leaked its slot, and
/// after four the endpoint refused everyone for good.
#[test]
fn a_failing_scrape_gives_its_slot_back() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    let calls = Arc::new(AtomicUsize::new(0));
    let counted = calls.clone();
    let server = MetricsServer::start(
        "127.0.0.1:0".parse().expect("addr"),
        Arc::new(move || {
            if counted.fetch_add(1, Ordering::SeqCst) < MAX_SCRAPERS + 1 {
                panic!("status failed (on purpose)");
            }
            common::status_document()
        }),
    )
    .expect("metrics server");
    for _ in 0..=MAX_SCRAPERS {
        let _ = scrape(server.local_addr());
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut answer = scrape(server.local_addr());
    while !answer.starts_with("HTTP/1.1 200") && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
        answer = scrape(server.local_addr());
    }
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer:?}");
}
