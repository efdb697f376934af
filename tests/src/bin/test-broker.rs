//! A rumqttd broker in its own process, so a test can kill it: `test-broker 127.0.0.1:PORT`.

fn main() {
    let addr = std::env::args()
        .nth(1)
        .expect("usage: test-broker ADDR")
        .parse()
        .expect("ADDR");
    let mut broker = rumqttd::Broker::new(mqsplice_tests::broker::rumqttd_config(addr));
    if let Err(e) = broker.start() {
        eprintln!("test-broker {addr}: {e}");
        std::process::exit(1);
    }
}
