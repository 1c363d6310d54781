#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code
#![allow(clippy::too_many_arguments)] // the bindings sol! generates for grant()
//! The contracts, as compiled into `contracts/artifacts`, on a real local node: `anvil`
//! from the npm package `@foundry-rs/anvil`, installed by `scripts/tools`.

use std::path::PathBuf;

use alloy::network::EthereumWallet;
use alloy::node_bindings::{Anvil, AnvilInstance};
use alloy::primitives::{Address, Bytes, B256, U256};
use alloy::providers::ext::AnvilApi;
use alloy::providers::{DynProvider, Provider, ProviderBuilder};
use alloy::signers::local::PrivateKeySigner;
use alloy::sol;

sol!(
    #[sol(rpc)]
    RecordToken,
    "../contracts/artifacts/RecordToken.json"
);
sol!(
    #[sol(rpc)]
    ConsentRegistry,
    "../contracts/artifacts/ConsentRegistry.json"
);
sol!(
    #[sol(rpc)]
    AuditAnchor,
    "../contracts/artifacts/AuditAnchor.json"
);
sol!(
    #[sol(rpc)]
    Paymaster,
    "../contracts/artifacts/Paymaster.json"
);

fn anvil_path() -> PathBuf {
    let path = std::env::var("AFYA_ANVIL")
        .map(PathBuf::from)
        .unwrap_or_else(|_| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../contracts/node_modules/.bin/anvil")
        });
    assert!(
        path.exists(),
        "anvil is not installed at {}: run scripts/tools (scripts/test does)",
        path.display()
    );
    path
}

/// A fresh node, and providers signing as its first (owner), second (operator) and
/// third (stranger) accounts.
struct Chain {
    _anvil: AnvilInstance,
    owner: DynProvider,
    operator: DynProvider,
    stranger: DynProvider,
    operator_address: Address,
    owner_address: Address,
    stranger_address: Address,
    unsigned: DynProvider,
}

fn signer(anvil: &AnvilInstance, i: usize) -> PrivateKeySigner {
    PrivateKeySigner::from(anvil.keys()[i].clone())
}

fn provider(anvil: &AnvilInstance, i: usize) -> DynProvider {
    ProviderBuilder::new()
        .wallet(EthereumWallet::from(signer(anvil, i)))
        .connect_http(anvil.endpoint_url())
        .erased()
}

fn chain() -> Chain {
    let anvil = Anvil::at(anvil_path()).spawn();
    Chain {
        owner: provider(&anvil, 0),
        operator: provider(&anvil, 1),
        stranger: provider(&anvil, 2),
        owner_address: signer(&anvil, 0).address(),
        operator_address: signer(&anvil, 1).address(),
        stranger_address: signer(&anvil, 2).address(),
        unsigned: ProviderBuilder::new()
            .connect_http(anvil.endpoint_url())
            .erased(),
        _anvil: anvil,
    }
}

fn id(n: u8) -> B256 {
    B256::repeat_byte(n)
}

/// A token id: a record UUID shifted left by 8 bits, its category in the low byte.
fn token(uuid: u128, category: u8) -> U256 {
    (U256::from(uuid) << 8) | U256::from(category)
}

#[tokio::test]
async fn record_tokens_are_minted_once_per_event_held_by_the_patient_and_not_transferable() {
    let c = chain();
    let t = RecordToken::deploy(&c.owner, c.owner_address, c.operator_address)
        .await
        .unwrap();
    let as_operator = RecordToken::new(*t.address(), &c.operator);
    let as_stranger = RecordToken::new(*t.address(), &c.stranger);
    let patient = Address::repeat_byte(0x11);
    let lab = token(0x1234_5678_9abc_def0_1234_5678_9abc_def0, 0);
    let hash = B256::repeat_byte(0xab);

    // Only an operator mints.
    assert!(as_stranger
        .mint(patient, lab, hash, id(1))
        .call()
        .await
        .is_err());
    as_operator
        .mint(patient, lab, hash, id(1))
        .send()
        .await
        .unwrap()
        .get_receipt()
        .await
        .unwrap();
    // A replay of the same event: no revert, nothing new.
    let replay = as_operator
        .mint(patient, lab, hash, id(1))
        .send()
        .await
        .unwrap()
        .get_receipt()
        .await
        .unwrap();
    assert!(replay.status());
    let minted = t.RecordMinted_filter().from_block(0).query().await.unwrap();
    assert_eq!(minted.len(), 1);
    assert_eq!(t.ownerOf(lab).call().await.unwrap(), patient);
    assert_eq!(t.balanceOf(patient).call().await.unwrap(), U256::from(1));
    assert_eq!(t.contentHash(lab).call().await.unwrap(), hash);
    let uri = t.tokenURI(lab).call().await.unwrap();
    assert_eq!(
        uri,
        format!("data:application/json,{{\"content_hash\":\"{hash}\"}}")
    );
    // Another event minting the same token is refused.
    assert!(as_operator
        .mint(patient, lab, hash, id(2))
        .call()
        .await
        .is_err());
    // ERC-721 and metadata interfaces; holders cannot move or approve it.
    assert!(t
        .supportsInterface([0x80, 0xac, 0x58, 0xcd].into())
        .call()
        .await
        .unwrap());
    let as_patient_like = RecordToken::new(*t.address(), &c.stranger);
    assert!(as_patient_like
        .transferFrom(patient, c.owner_address, lab)
        .call()
        .await
        .is_err());
    assert!(as_patient_like
        .approve(c.owner_address, lab)
        .call()
        .await
        .is_err());

    // Burnt on erasure, once.
    as_operator
        .burn(lab, id(3))
        .send()
        .await
        .unwrap()
        .get_receipt()
        .await
        .unwrap();
    assert!(t.ownerOf(lab).call().await.is_err());
    let again = as_operator
        .burn(lab, id(3))
        .send()
        .await
        .unwrap()
        .get_receipt()
        .await
        .unwrap();
    assert!(again.status());
    assert_eq!(
        t.RecordBurned_filter()
            .from_block(0)
            .query()
            .await
            .unwrap()
            .len(),
        1
    );
    assert_eq!(t.balanceOf(patient).call().await.unwrap(), U256::ZERO);
    // A burnt token is never minted again, whatever the event.
    assert!(as_operator
        .mint(patient, lab, hash, id(4))
        .call()
        .await
        .is_err());

    // Batches, each item idempotent by its event id.
    let (a, b) = (token(1, 0), token(2, 1));
    for _ in 0..2 {
        as_operator
            .mintBatch(
                vec![patient, patient],
                vec![a, b],
                vec![hash, hash],
                vec![id(10), id(11)],
            )
            .send()
            .await
            .unwrap()
            .get_receipt()
            .await
            .unwrap();
    }
    assert_eq!(t.balanceOf(patient).call().await.unwrap(), U256::from(2));
}

#[tokio::test]
async fn consent_follows_grants_by_category_or_token_until_expiry_or_revocation() {
    let c = chain();
    let t = RecordToken::deploy(&c.owner, c.owner_address, c.operator_address)
        .await
        .unwrap();
    let r = ConsentRegistry::deploy(&c.owner, c.owner_address, c.operator_address, *t.address())
        .await
        .unwrap();
    let tokens = RecordToken::new(*t.address(), &c.operator);
    let registry = ConsentRegistry::new(*r.address(), &c.operator);
    let patient = Address::repeat_byte(0x11);
    let doctor = Address::repeat_byte(0x22);
    let other_doctor = Address::repeat_byte(0x33);
    let (lab, imaging, note) = (token(1, 0), token(2, 1), token(3, 5));
    for (i, tok) in [lab, imaging, note].into_iter().enumerate() {
        tokens
            .mint(patient, tok, B256::ZERO, id(100 + i as u8))
            .send()
            .await
            .unwrap()
            .get_receipt()
            .await
            .unwrap();
    }
    let expiry = 2_000_000_000u64;
    let request = id(0x42);
    // Lab results (category bit 0) and one named clinical note.
    for _ in 0..2 {
        registry
            .grant(request, patient, doctor, 0b1, vec![note], expiry, id(1))
            .send()
            .await
            .unwrap()
            .get_receipt()
            .await
            .unwrap();
    }
    assert_eq!(
        r.ConsentGranted_filter()
            .from_block(0)
            .query()
            .await
            .unwrap()
            .len(),
        1,
        "a replayed grant adds nothing"
    );
    let now = 1_900_000_000u64;
    let access = |who: Address, tok: U256, at: u64| {
        let r = r.clone();
        async move { r.hasAccess(who, tok, at).call().await.unwrap() }
    };
    assert!(access(doctor, lab, now).await);
    assert!(access(doctor, note, now).await);
    assert!(!access(doctor, imaging, now).await, "imaging not granted");
    assert!(!access(other_doctor, lab, now).await, "another doctor");
    assert!(!access(doctor, lab, expiry).await, "expired");
    assert!(!access(doctor, token(9, 0), now).await, "no such token");
    // Only operators write.
    assert!(ConsentRegistry::new(*r.address(), &c.stranger)
        .revoke(request, id(2))
        .call()
        .await
        .is_err());

    for _ in 0..2 {
        registry
            .revoke(request, id(2))
            .send()
            .await
            .unwrap()
            .get_receipt()
            .await
            .unwrap();
    }
    assert!(!access(doctor, lab, now).await);
    assert!(!access(doctor, note, now).await);
    assert_eq!(
        r.ConsentRevoked_filter()
            .from_block(0)
            .query()
            .await
            .unwrap()
            .len(),
        1
    );
    // A new grant for the same request id is refused; another request may grant again.
    assert!(registry
        .grant(request, patient, doctor, 0b1, vec![], expiry, id(3))
        .call()
        .await
        .is_err());
    registry
        .grant(id(0x43), patient, doctor, 0b10, vec![], expiry, id(4))
        .send()
        .await
        .unwrap()
        .get_receipt()
        .await
        .unwrap();
    assert!(access(doctor, imaging, now).await);
    assert!(!access(doctor, lab, now).await);
}

#[tokio::test]
async fn grants_in_a_batch_are_each_replay_safe_and_one_bad_grant_reverts_the_batch() {
    let c = chain();
    let t = RecordToken::deploy(&c.owner, c.owner_address, c.operator_address)
        .await
        .unwrap();
    let r = ConsentRegistry::deploy(&c.owner, c.owner_address, c.operator_address, *t.address())
        .await
        .unwrap();
    let registry = ConsentRegistry::new(*r.address(), &c.operator);
    let patient = Address::repeat_byte(0x11);
    let grant = |n: u8, event: u8| ConsentRegistry::GrantRequest {
        grantId: id(n),
        patient,
        grantee: Address::repeat_byte(n),
        categories: 1 << (n % 7),
        tokenIds: vec![token(u128::from(n), 5)],
        expiry: 2_000_000_000,
        eventId: id(event),
    };
    // One grant already on chain, then a batch of it and two new ones, twice.
    registry
        .grant(
            id(1),
            patient,
            Address::repeat_byte(1),
            0b100,
            vec![token(1, 5)],
            2_000_000_000,
            id(101),
        )
        .send()
        .await
        .unwrap()
        .get_receipt()
        .await
        .unwrap();
    let batch = vec![grant(1, 101), grant(2, 102), grant(3, 103)];
    for _ in 0..2 {
        let receipt = registry
            .grantBatch(batch.clone())
            .send()
            .await
            .unwrap()
            .get_receipt()
            .await
            .unwrap();
        assert!(receipt.status());
    }
    let granted = r
        .ConsentGranted_filter()
        .from_block(0)
        .query()
        .await
        .unwrap();
    assert_eq!(granted.len(), 3, "one each, replays adding nothing");
    for n in [2u8, 3] {
        let g = r.grants(id(n)).call().await.unwrap();
        assert_eq!(g.grantee, Address::repeat_byte(n));
        assert_eq!(g.patient, patient);
        assert_eq!(g.categories, 1 << (n % 7));
        assert!(r
            .coversToken(id(n), token(u128::from(n), 5))
            .call()
            .await
            .unwrap());
    }
    // The grant that was on chain before the batch kept its own scope.
    assert_eq!(r.grants(id(1)).call().await.unwrap().categories, 0b100);
    // A second grant under an existing id (a new event) reverts the whole batch.
    assert!(registry
        .grantBatch(vec![grant(4, 104), grant(2, 105)])
        .call()
        .await
        .is_err());
    assert_eq!(r.grants(id(4)).call().await.unwrap().patient, Address::ZERO);
    // Only operators write.
    assert!(ConsentRegistry::new(*r.address(), &c.stranger)
        .grantBatch(vec![grant(5, 106)])
        .call()
        .await
        .is_err());
}

#[tokio::test]
async fn audit_anchors_are_contiguous_append_only_and_replay_safe() {
    let c = chain();
    let a = AuditAnchor::deploy(&c.owner, c.owner_address, c.operator_address)
        .await
        .unwrap();
    let anchors = AuditAnchor::new(*a.address(), &c.operator);
    assert_eq!(a.nextPosition().call().await.unwrap(), 1);
    // The first range starts at 1.
    assert!(anchors.anchor(id(1), 2, 100).call().await.is_err());
    let send = |root: B256, from: u64, to: u64| {
        let anchors = anchors.clone();
        async move {
            anchors
                .anchor(root, from, to)
                .send()
                .await
                .unwrap()
                .get_receipt()
                .await
                .unwrap()
        }
    };
    send(id(1), 1, 100).await;
    send(id(2), 101, 250).await;
    // Replays of anchored ranges: nothing new.
    send(id(1), 1, 100).await;
    send(id(2), 101, 250).await;
    assert_eq!(a.anchorCount().call().await.unwrap(), U256::from(2));
    assert_eq!(
        a.LogRangeAnchored_filter()
            .from_block(0)
            .query()
            .await
            .unwrap()
            .len(),
        2
    );
    let second = a.anchorAt(U256::from(1)).call().await.unwrap();
    assert_eq!(
        (second.root, second.fromPosition, second.toPosition),
        (id(2), 101, 250)
    );
    assert_eq!(a.nextPosition().call().await.unwrap(), 251);
    // A different root for an anchored range, a gap, an overlap, an empty range, a stranger.
    assert!(anchors.anchor(id(9), 101, 250).call().await.is_err());
    assert!(anchors.anchor(id(3), 300, 400).call().await.is_err());
    assert!(anchors.anchor(id(3), 200, 400).call().await.is_err());
    assert!(anchors.anchor(id(3), 251, 250).call().await.is_err());
    assert!(AuditAnchor::new(*a.address(), &c.stranger)
        .anchor(id(3), 251, 300)
        .call()
        .await
        .is_err());
}

#[tokio::test]
async fn the_owner_appoints_operators_and_hands_ownership_on() {
    let c = chain();
    let a = AuditAnchor::deploy(&c.owner, c.owner_address, c.operator_address)
        .await
        .unwrap();
    let stranger_address = c.stranger_address;
    let as_stranger = AuditAnchor::new(*a.address(), &c.stranger);
    assert!(as_stranger
        .setOperator(stranger_address, true)
        .call()
        .await
        .is_err());
    a.setOperator(stranger_address, true)
        .send()
        .await
        .unwrap()
        .get_receipt()
        .await
        .unwrap();
    as_stranger
        .anchor(id(1), 1, 10)
        .send()
        .await
        .unwrap()
        .get_receipt()
        .await
        .unwrap();
    a.setOperator(c.operator_address, false)
        .send()
        .await
        .unwrap()
        .get_receipt()
        .await
        .unwrap();
    assert!(AuditAnchor::new(*a.address(), &c.operator)
        .anchor(id(2), 11, 20)
        .call()
        .await
        .is_err());
    a.transferOwnership(stranger_address)
        .send()
        .await
        .unwrap()
        .get_receipt()
        .await
        .unwrap();
    assert_eq!(a.owner().call().await.unwrap(), stranger_address);
    assert!(a.setOperator(c.owner_address, true).call().await.is_err());
}

#[tokio::test]
async fn the_paymaster_pays_only_for_allowed_senders_and_targets_within_its_cap() {
    let c = chain();
    let t = RecordToken::deploy(&c.owner, c.owner_address, c.operator_address)
        .await
        .unwrap();
    let cap = U256::from(10u64.pow(15));
    let p = Paymaster::deploy(&c.owner, c.owner_address, c.operator_address, cap)
        .await
        .unwrap();
    p.setTarget(*t.address(), true)
        .send()
        .await
        .unwrap()
        .get_receipt()
        .await
        .unwrap();
    // Funded, as M-Pesa payments would.
    c.owner
        .anvil_set_balance(*p.address(), U256::from(10u64.pow(18)))
        .await
        .unwrap();
    let bootloader: Address = "0x0000000000000000000000000000000000008001"
        .parse()
        .unwrap();
    c.owner.anvil_impersonate_account(bootloader).await.unwrap();
    c.owner
        .anvil_set_balance(bootloader, U256::from(10u64.pow(18)))
        .await
        .unwrap();
    let general = {
        // IPaymasterFlow.general(bytes) with empty input.
        let selector = &alloy::primitives::keccak256("general(bytes)")[..4];
        let mut input = selector.to_vec();
        input.extend_from_slice(&[0u8; 31]);
        input.push(0x20);
        input.extend_from_slice(&[0u8; 32]);
        Bytes::from(input)
    };
    let tx = |from: Address, to: Address, gas: u64, flow: Bytes| Paymaster::Transaction {
        txType: U256::from(0x71),
        from: U256::from_be_slice(from.as_slice()),
        to: U256::from_be_slice(to.as_slice()),
        gasLimit: U256::from(gas),
        gasPerPubdataByteLimit: U256::from(50_000),
        maxFeePerGas: U256::from(1_000_000_000u64),
        maxPriorityFeePerGas: U256::ZERO,
        paymaster: U256::from_be_slice(p.address().as_slice()),
        nonce: U256::ZERO,
        value: U256::ZERO,
        reserved: [U256::ZERO; 4],
        data: Bytes::new(),
        signature: Bytes::new(),
        factoryDeps: vec![],
        paymasterInput: flow,
        reservedDynamic: Bytes::new(),
    };
    let as_bootloader = Paymaster::new(*p.address(), &c.unsigned);
    let ok = tx(c.operator_address, *t.address(), 200_000, general.clone());
    let answer = as_bootloader
        .validateAndPayForPaymasterTransaction(B256::ZERO, B256::ZERO, ok.clone())
        .from(bootloader)
        .call()
        .await
        .unwrap();
    assert_eq!(
        answer.magic,
        alloy::primitives::FixedBytes::<4>::from_slice(
            &alloy::primitives::keccak256(
                "validateAndPayForPaymasterTransaction(bytes32,bytes32,(uint256,uint256,uint256,uint256,uint256,uint256,uint256,uint256,uint256,uint256,uint256[4],bytes,bytes,bytes32[],bytes,bytes))"
            )[..4]
        )
    );
    let before = c.owner.get_balance(bootloader).await.unwrap();
    as_bootloader
        .validateAndPayForPaymasterTransaction(B256::ZERO, B256::ZERO, ok.clone())
        .from(bootloader)
        .gas(500_000)
        .send()
        .await
        .unwrap()
        .get_receipt()
        .await
        .unwrap();
    let required = U256::from(200_000u64 * 1_000_000_000);
    assert_eq!(p.spent().call().await.unwrap(), required);
    assert!(c.owner.get_balance(bootloader).await.unwrap() > before);

    let refused = |t: Paymaster::Transaction, from: Address| {
        let as_bootloader = as_bootloader.clone();
        async move {
            as_bootloader
                .validateAndPayForPaymasterTransaction(B256::ZERO, B256::ZERO, t)
                .from(from)
                .call()
                .await
                .is_err()
        }
    };
    // Not the bootloader; a sender or a target not allowed; another flow; over the cap.
    assert!(refused(ok.clone(), c.owner_address).await);
    assert!(
        refused(
            tx(c.owner_address, *t.address(), 200_000, general.clone()),
            bootloader
        )
        .await
    );
    assert!(
        refused(
            tx(
                c.operator_address,
                Address::repeat_byte(9),
                200_000,
                general.clone()
            ),
            bootloader
        )
        .await
    );
    assert!(
        refused(
            tx(
                c.operator_address,
                *t.address(),
                200_000,
                Bytes::from(vec![1, 2, 3, 4])
            ),
            bootloader
        )
        .await
    );
    assert!(
        refused(
            tx(c.operator_address, *t.address(), 1_000_000, general.clone()),
            bootloader
        )
        .await
    );
}
