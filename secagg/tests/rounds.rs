//! Whole rounds of secure aggregation between simulated nodes and a
//! coordinator, with nodes dropping at each step, tampered shares and
//! contradictory requests. Messages go through JSON, as they would on the
//! wire.

use ghx_secagg::{
    Advertise, Aggregate, Aggregator, Client, EncryptedShare, Error, MaskedInput, RoundParams,
    Unmasking, decode, encode,
};

fn wire<T: serde::Serialize + serde::de::DeserializeOwned>(message: T) -> T {
    serde_json::from_str(&serde_json::to_string(&message).unwrap()).unwrap()
}

/// Where a node stops taking part.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Drop {
    Never,
    BeforeSharing,
    BeforeMaskedInput,
    BeforeUnmasking,
}

fn names(n: usize) -> Vec<String> {
    (0..n).map(|i| format!("hospital-{i}")).collect()
}

/// Runs a round; returns the aggregate (or the coordinator's error) and
/// the masked inputs the coordinator saw.
fn run(
    threshold: u8,
    inputs: &[Vec<f64>],
    drops: &[Drop],
) -> (Result<Aggregate, Error>, Vec<MaskedInput>) {
    let nodes = names(inputs.len());
    let params = RoundParams::new(
        "study-0001/train/round-1",
        nodes.clone(),
        threshold,
        inputs[0].len(),
    )
    .unwrap();
    let mut aggregator = Aggregator::new(params.clone());
    let mut clients = Vec::new();
    for node in &nodes {
        let (client, advertise) = Client::new(params.clone(), node).unwrap();
        aggregator.advertise(wire(advertise)).unwrap();
        clients.push(client);
    }
    let advertised: Vec<Advertise> = match aggregator.advertisements() {
        Ok(a) => a,
        Err(e) => return (Err(e), Vec::new()),
    };
    for (i, client) in clients.iter_mut().enumerate() {
        if drops[i] == Drop::BeforeSharing {
            continue;
        }
        let shares = client.share_keys(&wire(advertised.clone())).unwrap();
        aggregator.submit_shares(&nodes[i], wire(shares)).unwrap();
    }
    let mut seen = Vec::new();
    for (i, client) in clients.iter_mut().enumerate() {
        if matches!(drops[i], Drop::BeforeSharing | Drop::BeforeMaskedInput) {
            continue;
        }
        let shares = match aggregator.shares_for(&nodes[i]) {
            Ok(s) => s,
            Err(e) => return (Err(e), seen),
        };
        let masked = client
            .mask_input(&wire(shares), &encode(&inputs[i]).unwrap())
            .unwrap();
        seen.push(masked.clone());
        aggregator.submit_masked(wire(masked)).unwrap();
    }
    let survivors = match aggregator.survivors() {
        Ok(s) => s,
        Err(e) => return (Err(e), seen),
    };
    let mut unmaskings = Vec::new();
    for (i, client) in clients.iter_mut().enumerate() {
        if drops[i] != Drop::Never {
            continue;
        }
        unmaskings.push(wire(client.unmask(&survivors).unwrap()));
    }
    (aggregator.finish(&unmaskings), seen)
}

fn plain_sum(inputs: &[Vec<f64>], included: impl Fn(usize) -> bool) -> Vec<u64> {
    let mut sum = vec![0u64; inputs[0].len()];
    for (i, input) in inputs.iter().enumerate().filter(|(i, _)| included(*i)) {
        for (s, v) in sum.iter_mut().zip(encode(input).unwrap()) {
            *s = s.wrapping_add(v);
        }
        let _ = i;
    }
    sum
}

fn updates(n: usize, dim: usize) -> Vec<Vec<f64>> {
    (0..n)
        .map(|i| {
            (0..dim)
                .map(|j| (i as f64 + 1.0) * 0.37 - j as f64 * 1.25 + 1000.0 * (j % 3) as f64)
                .collect()
        })
        .collect()
}

#[test]
fn with_everyone_present_the_sum_is_exact_and_no_input_is_visible() {
    let inputs = updates(4, 50);
    let (aggregate, seen) = run(3, &inputs, &[Drop::Never; 4]);
    let aggregate = aggregate.unwrap();
    assert_eq!(aggregate.sum, plain_sum(&inputs, |_| true));
    assert_eq!(aggregate.contributors.len(), 4);
    assert!(aggregate.dropped.is_empty());
    // What the coordinator saw of each node is masked: no coordinate of a
    // masked input equals the node's encoded update.
    for (masked, input) in seen.iter().zip(&inputs) {
        let encoded = encode(input).unwrap();
        let equal = masked
            .values
            .iter()
            .zip(&encoded)
            .filter(|(a, b)| a == b)
            .count();
        assert_eq!(equal, 0, "{} leaked {equal} values", masked.node);
    }
    let decoded = decode(&aggregate.sum);
    let expected: Vec<f64> = (0..50)
        .map(|j| inputs.iter().map(|x| x[j]).sum::<f64>())
        .collect();
    for (d, e) in decoded.iter().zip(&expected) {
        assert!((d - e).abs() < 1e-5, "{d} vs {e}");
    }
}

#[test]
fn the_in_process_round_sums_exactly() {
    let inputs = updates(3, 6);
    let encoded: std::collections::BTreeMap<String, Vec<u64>> = names(3)
        .into_iter()
        .zip(&inputs)
        .map(|(n, x)| (n, encode(x).unwrap()))
        .collect();
    let params = RoundParams::new("r", encoded.keys().cloned(), 2, 6).unwrap();
    let aggregate = ghx_secagg::sum_in_process(&params, &encoded).unwrap();
    assert_eq!(aggregate.sum, plain_sum(&inputs, |_| true));
}

#[test]
fn a_node_dropping_before_sharing_is_simply_absent() {
    let inputs = updates(4, 8);
    let drops = [Drop::Never, Drop::BeforeSharing, Drop::Never, Drop::Never];
    let aggregate = run(3, &inputs, &drops).0.unwrap();
    assert_eq!(aggregate.sum, plain_sum(&inputs, |i| i != 1));
    assert!(aggregate.dropped.is_empty());
}

#[test]
fn a_node_dropping_after_sharing_has_its_pairwise_masks_removed() {
    let inputs = updates(5, 8);
    let drops = [
        Drop::Never,
        Drop::Never,
        Drop::BeforeMaskedInput,
        Drop::Never,
        Drop::BeforeMaskedInput,
    ];
    let aggregate = run(3, &inputs, &drops).0.unwrap();
    assert_eq!(aggregate.sum, plain_sum(&inputs, |i| i != 2 && i != 4));
    assert_eq!(aggregate.dropped, vec!["hospital-2", "hospital-4"]);
}

#[test]
fn a_node_dropping_after_its_masked_input_still_counts() {
    let inputs = updates(4, 8);
    let drops = [Drop::Never, Drop::Never, Drop::Never, Drop::BeforeUnmasking];
    let aggregate = run(3, &inputs, &drops).0.unwrap();
    assert_eq!(aggregate.sum, plain_sum(&inputs, |_| true));
    assert_eq!(aggregate.contributors.len(), 4);
}

#[test]
fn too_few_nodes_stop_the_round_with_a_named_step() {
    let inputs = updates(3, 4);
    let drops = [
        Drop::Never,
        Drop::BeforeMaskedInput,
        Drop::BeforeMaskedInput,
    ];
    let err = run(2, &inputs, &drops).0.unwrap_err();
    assert_eq!(
        err.to_string(),
        "round study-0001/train/round-1: only 1 nodes are left at unmasking, 2 are needed"
    );
    // Survivors present, but too few of them answer the unmasking step.
    let drops = [Drop::Never, Drop::BeforeUnmasking, Drop::BeforeUnmasking];
    let err = run(2, &inputs, &drops).0.unwrap_err();
    assert!(
        matches!(
            err,
            Error::TooFewNodes {
                have: 1,
                need: 2,
                ..
            }
        ),
        "{err}"
    );
}

#[test]
fn bad_parameters_and_out_of_range_updates_are_named() {
    let err = RoundParams::new("r", ["a", "b"], 3, 1).unwrap_err();
    assert_eq!(
        err.to_string(),
        "round r: the threshold 3 must be at least 2 and at most the 2 participants"
    );
    assert!(RoundParams::new("r", ["a", "b", "c"], 1, 1).is_err());
    let err = encode(&[1.0, f64::NAN]).unwrap_err();
    assert!(
        err.to_string()
            .starts_with("update value 1 is not a finite number"),
        "{err}"
    );
    // Issue 38 (5): the unmasked value itself is never in the message.
    let err = encode(&[123456789012.5]).unwrap_err();
    assert!(!err.to_string().contains("123456789012"), "{err}");
    let params = RoundParams::new("r", ["a", "b", "c"], 2, 1).unwrap();
    assert!(matches!(
        Client::new(params, "mallory"),
        Err(Error::NotParticipant { .. })
    ));
}

/// Three clients through step 1, for the tests that tamper.
fn advertised_round() -> (Vec<Client>, Aggregator, Vec<String>) {
    let nodes = names(3);
    let params = RoundParams::new("r", nodes.clone(), 2, 2).unwrap();
    let mut aggregator = Aggregator::new(params.clone());
    let mut clients = Vec::new();
    for node in &nodes {
        let (client, advertise) = Client::new(params.clone(), node).unwrap();
        aggregator.advertise(advertise).unwrap();
        clients.push(client);
    }
    (clients, aggregator, nodes)
}

/// Three clients through step 2, for the tests that tamper.
fn shared_round() -> (Vec<Client>, Aggregator, Vec<String>) {
    let (mut clients, mut aggregator, nodes) = advertised_round();
    let advertised = aggregator.advertisements().unwrap();
    for (client, node) in clients.iter_mut().zip(&nodes) {
        let shares = client.share_keys(&advertised).unwrap();
        aggregator.submit_shares(node, shares).unwrap();
    }
    (clients, aggregator, nodes)
}

#[test]
fn a_tampered_or_misrouted_share_is_refused_naming_its_sender() {
    let (mut clients, aggregator, nodes) = shared_round();
    let mut shares: Vec<EncryptedShare> = aggregator.shares_for(&nodes[0]).unwrap();
    shares[0].ciphertext[3] ^= 1;
    let err = clients[0].mask_input(&shares, &[0, 0]).unwrap_err();
    assert_eq!(
        err.to_string(),
        format!(
            "round r: the share from {} to hospital-0 is missing, misrouted or does not decrypt",
            shares[0].from
        )
    );
    // A share meant for another node does not open here either.
    let other = aggregator.shares_for(&nodes[1]).unwrap();
    assert!(matches!(
        clients[0].mask_input(&other, &[0, 0]),
        Err(Error::BadShare { .. })
    ));
}

#[test]
fn a_node_deals_shares_only_to_a_list_holding_its_own_keys() {
    let (mut clients, aggregator, _) = advertised_round();
    let mut advertised = aggregator.advertisements().unwrap();
    advertised[0].mask_key = advertised[1].mask_key;
    let err = clients[0].share_keys(&advertised).unwrap_err();
    assert_eq!(
        err.to_string(),
        "round r: the keys listed as hospital-0's own are not the ones it advertised"
    );
}

#[test]
fn a_node_masks_its_input_once_and_deals_its_keys_once() {
    let (mut clients, aggregator, nodes) = shared_round();
    let shares = aggregator.shares_for(&nodes[0]).unwrap();
    clients[0].mask_input(&shares, &[1, 2]).unwrap();
    // Two masked inputs over different peers would differ by pairwise
    // masks; the second is refused whatever shares it comes with.
    let err = clients[0].mask_input(&shares[..1], &[1, 2]).unwrap_err();
    assert_eq!(
        err.to_string(),
        "round r: hospital-0 sent its masked input twice"
    );
    let advertised = aggregator.advertisements().unwrap();
    let err = clients[1].share_keys(&advertised).unwrap_err();
    assert_eq!(
        err.to_string(),
        "round r: hospital-1 sent its key shares twice"
    );
}

#[test]
fn a_node_refuses_to_unmask_for_two_different_survivor_sets() {
    let (mut clients, aggregator, nodes) = shared_round();
    let mut masked: Vec<Unmasking> = Vec::new();
    for (i, client) in clients.iter_mut().enumerate() {
        let shares = aggregator.shares_for(&nodes[i]).unwrap();
        client.mask_input(&shares, &[1, 2]).unwrap();
    }
    masked.push(clients[0].unmask(&nodes).unwrap());
    // Asked again with hospital-2 "dropped", the node would hand out the
    // mask key of a node whose self mask it already revealed.
    let err = clients[0].unmask(&nodes[..2]).unwrap_err();
    assert_eq!(
        err.to_string(),
        "round r: revealing what was asked would unmask hospital-2's own update; refused"
    );
    assert_eq!(masked[0].self_mask_shares.len(), 3);
    assert!(masked[0].mask_key_shares.is_empty());
}

#[test]
fn the_coordinator_refuses_steps_out_of_order_and_twice() {
    let (_, mut aggregator, nodes) = shared_round();
    let err = aggregator.submit_shares(&nodes[0], Vec::new()).unwrap_err();
    assert_eq!(
        err.to_string(),
        "round r: hospital-0 sent its key shares twice"
    );
    let err = aggregator.survivors().unwrap_err();
    assert!(matches!(err, Error::TooFewNodes { have: 0, .. }), "{err}");
    let err = aggregator
        .submit_masked(MaskedInput {
            node: nodes[1].clone(),
            values: vec![1],
        })
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        "round r: hospital-1 sent an update of 1 values, the round sums 2"
    );
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig::with_cases(24))]
    #[test]
    fn any_drop_pattern_leaving_the_threshold_sums_the_survivors(
        n in 3usize..6,
        dim in 1usize..12,
        pattern in proptest::collection::vec(0u8..4, 6),
        scale in -500.0f64..500.0,
    ) {
        let inputs: Vec<Vec<f64>> = (0..n)
            .map(|i| (0..dim).map(|j| scale * (i as f64 - j as f64) / 7.0).collect())
            .collect();
        let drops: Vec<Drop> = pattern[..n].iter().map(|p| match p {
            1 => Drop::BeforeSharing,
            2 => Drop::BeforeMaskedInput,
            3 => Drop::BeforeUnmasking,
            _ => Drop::Never,
        }).collect();
        let threshold = 2u8;
        let answering = drops.iter().filter(|d| **d == Drop::Never).count();
        let (result, _) = run(threshold, &inputs, &drops);
        if answering >= usize::from(threshold) {
            let aggregate = result.unwrap();
            let included = |i: usize| matches!(drops[i], Drop::Never | Drop::BeforeUnmasking);
            proptest::prop_assert_eq!(aggregate.sum, plain_sum(&inputs, included));
        } else {
            proptest::prop_assert!(result.is_err());
        }
    }
}
