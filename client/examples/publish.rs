//! Publishes a few events to a relay over the native QUIC protocol and prints what became of
//! each: one request on its own stream, then several pipelined on one stream.
//!
//! ```text
//! cargo run -p edgerelay-client --example publish -- 127.0.0.1:8443 ca.pem "$TOKEN" edge.demo
//! ```
//!
//! The relay needs `quic.listen` set; `ca.pem` is the CA of its certificate (`edgerelay
//! dev-certs` writes one), and the token must allow publishing to the subject.

use std::error::Error;

use edgerelay_client::proto::event_result::Outcome;
use edgerelay_client::proto::PublishResponse;
use edgerelay_client::{event, Client, ClientConfig};

#[tokio::main]
async fn main() -> Result<(), Box<dyn Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [addr, ca, token, subject] = args.as_slice() else {
        return Err("usage: publish ADDR CA_PEM TOKEN SUBJECT".into());
    };
    let client = Client::connect(ClientConfig {
        server: addr.parse()?,
        server_name: "localhost".into(),
        ca_pem: Some(std::fs::read_to_string(ca)?),
        token: token.clone(),
        client_cert: None,
    })
    .await?;

    // One request on its own stream.
    let answer = client.publish(vec![event(subject, "hello"), event(subject, "world")]).await?;
    print_answer(&answer);

    // Many requests pipelined on one stream: the answers come back in order.
    let mut stream = client.stream().await?;
    for i in 0..3 {
        stream.send(vec![event(subject, format!("pipelined {i}"))]).await?;
    }
    for _ in 0..3 {
        print_answer(&stream.recv().await?);
    }
    stream.finish();
    client.close();
    Ok(())
}

/// One line per event. A refused event with a `retry_after_ms` may be sent again, with the
/// same id, after that long; the other outcomes are final.
fn print_answer(answer: &PublishResponse) {
    if let Some(e) = &answer.error {
        println!("request refused: {} ({}): {}", e.code, e.reason, e.message);
    }
    for (i, result) in answer.results.iter().enumerate() {
        match &result.outcome {
            Some(Outcome::Accepted(a)) => {
                println!("event {i}: stored in {} at {}", a.stream, a.seq)
            }
            Some(Outcome::Queued(_)) => println!("event {i}: queued in the relay"),
            Some(Outcome::Spooled(_)) => println!("event {i}: on the relay's disk spool"),
            Some(Outcome::Refused(r)) if r.retry_after_ms > 0 => println!(
                "event {i}: refused {}: {}; retry with the same id after {} ms",
                r.code, r.message, r.retry_after_ms
            ),
            Some(Outcome::Refused(r)) => println!("event {i}: refused {}: {}", r.code, r.message),
            None => println!("event {i}: no outcome (a newer relay?)"),
        }
    }
}
