//! The librdkafka this crate is built with (the daemon's producer and the L1's
//! consumer are the same library) speaks TLS and SASL, so that `security.protocol =
//! ssl | sasl_ssl` and `sasl.mechanism = PLAIN | SCRAM-SHA-256 | SCRAM-SHA-512` work
//! in `[kafka.properties]` and through `L1Builder::kafka_property`. A build change that
//! drops them fails here, not at a user's first connection. lz4 too: the producer
//! compresses with it over TLS unless told otherwise (`src/sink/kafka/mod.rs`).

use rdkafka::config::ClientConfig;

fn builtin_features() -> Vec<String> {
    ClientConfig::new()
        .create_native_config()
        .unwrap()
        .get("builtin.features")
        .unwrap()
        .split(',')
        .map(str::to_string)
        .collect()
}

#[test]
fn librdkafka_is_built_with_ssl_sasl_and_lz4() {
    let features = builtin_features();
    for wanted in ["ssl", "sasl", "sasl_plain", "sasl_scram", "lz4"] {
        assert!(
            features.iter().any(|f| f == wanted),
            "librdkafka lacks {wanted}: builtin.features = {features:?}"
        );
    }
}

#[test]
fn a_tls_config_is_accepted_by_the_library() {
    // Refused at configuration time when SSL is not built in.
    let mut config = ClientConfig::new();
    config
        .set("bootstrap.servers", "127.0.0.1:1")
        .set("security.protocol", "sasl_ssl")
        .set("sasl.mechanism", "SCRAM-SHA-512")
        .set("sasl.username", "u")
        .set("sasl.password", "p");
    let producer: Result<rdkafka::producer::BaseProducer, _> = config.create();
    assert!(producer.is_ok(), "{:?}", producer.err());
}
