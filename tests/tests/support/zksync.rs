//! A zkSync Era JSON-RPC endpoint for the adapter's zkSync mode. No zkSync node runs
//! here, so this one speaks the part of zkSync's protocol the adapter uses, in front of
//! a real anvil that executes the calls:
//!
//! - `zks_estimateFee` takes zkSync's call request (`eip712Meta` with `gasPerPubdata`
//!   and `paymasterParams`, whose `paymasterInput` is an array of byte values) and
//!   answers zkSync's snake_case fee (`gas_limit`, `gas_per_pubdata_limit`,
//!   `max_fee_per_gas`, `max_priority_fee_per_gas`);
//! - `eth_sendRawTransaction` of a type 0x71 transaction is decoded from its RLP (written
//!   here from zkSync's transaction layout, not with the adapter's code), its EIP-712
//!   signature must recover to its `from`, its nonce must be the sender's next, and, as
//!   Era's bootloader does, the real `Paymaster` contract is asked to validate and pay
//!   (`validateAndPayForPaymasterTransaction` called from the bootloader address) before
//!   the call runs as the sender; a refusal is an RPC error, as on Era;
//! - `eth_getTransactionReceipt` of a 0x71 hash answers the receipt with type `0x71`;
//! - everything else goes to anvil unchanged.

#![allow(dead_code)]

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use actix_web::{web, App, HttpResponse, HttpServer};
use alloy::primitives::{keccak256, Address, Bytes, Signature, B256, U256};
use alloy::rlp::{Decodable, Header};
use alloy::sol_types::{eip712_domain, SolCall, SolStruct};
use serde_json::{json, Value};

alloy::sol! {
    /// zkSync Era's EIP-712 transaction type (the system contracts' `Transaction` as
    /// signed: addresses as uint256, factory dependencies by hash).
    struct Transaction {
        uint256 txType;
        uint256 from;
        uint256 to;
        uint256 gasLimit;
        uint256 gasPerPubdataByteLimit;
        uint256 maxFeePerGas;
        uint256 maxPriorityFeePerGas;
        uint256 paymaster;
        uint256 nonce;
        uint256 value;
        bytes data;
        bytes32[] factoryDeps;
        bytes paymasterInput;
    }
}

const BOOTLOADER: Address = Address::new([
    0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x80, 0x01,
]);

/// A decoded 0x71 transaction.
#[derive(Clone, Debug)]
pub struct Decoded {
    pub nonce: u64,
    pub max_priority_fee_per_gas: u128,
    pub max_fee_per_gas: u128,
    pub gas_limit: u64,
    pub to: Address,
    pub value: U256,
    pub data: Bytes,
    pub signature: Signature,
    pub chain_id: u64,
    pub from: Address,
    pub gas_per_pubdata: U256,
    pub paymaster: Address,
    pub paymaster_input: Bytes,
}

/// Decodes `0x71 || rlp([...])` (zkSync's EIP-712 transaction layout).
pub fn decode(raw: &[u8]) -> Result<Decoded, String> {
    let e = |what: &str| format!("malformed 0x71 transaction: {what}");
    let (&ty, mut buf) = raw.split_first().ok_or_else(|| e("empty"))?;
    if ty != 0x71 {
        return Err(e("not type 0x71"));
    }
    let header = Header::decode(&mut buf).map_err(|_| e("header"))?;
    if !header.list || header.payload_length != buf.len() {
        return Err(e("list length"));
    }
    let b = &mut buf;
    let nonce = u64::decode(b).map_err(|_| e("nonce"))?;
    let max_priority_fee_per_gas = u128::decode(b).map_err(|_| e("tip"))?;
    let max_fee_per_gas = u128::decode(b).map_err(|_| e("fee"))?;
    let gas_limit = u64::decode(b).map_err(|_| e("gas"))?;
    let to = Address::decode(b).map_err(|_| e("to"))?;
    let value = U256::decode(b).map_err(|_| e("value"))?;
    let data = Bytes::decode(b).map_err(|_| e("data"))?;
    let v = u64::decode(b).map_err(|_| e("v"))?;
    let r = U256::decode(b).map_err(|_| e("r"))?;
    let s = U256::decode(b).map_err(|_| e("s"))?;
    if v > 1 {
        return Err(e("v is not a y parity (unsigned?)"));
    }
    let chain_id = u64::decode(b).map_err(|_| e("chain id"))?;
    let from = Address::decode(b).map_err(|_| e("from"))?;
    let gas_per_pubdata = U256::decode(b).map_err(|_| e("gas per pubdata"))?;
    let deps = Vec::<Bytes>::decode(b).map_err(|_| e("factory deps"))?;
    if !deps.is_empty() {
        return Err(e("factory deps are not expected"));
    }
    let custom = Bytes::decode(b).map_err(|_| e("custom signature"))?;
    if !custom.is_empty() {
        return Err(e("custom signature is not expected"));
    }
    let params = Header::decode(b).map_err(|_| e("paymaster params"))?;
    if !params.list || params.payload_length == 0 {
        return Err(e("no paymaster params"));
    }
    let paymaster = Address::decode(b).map_err(|_| e("paymaster"))?;
    let paymaster_input = Bytes::decode(b).map_err(|_| e("paymaster input"))?;
    if !b.is_empty() {
        return Err(e("trailing fields"));
    }
    Ok(Decoded {
        nonce,
        max_priority_fee_per_gas,
        max_fee_per_gas,
        gas_limit,
        to,
        value,
        data,
        signature: Signature::new(r, s, v == 1),
        chain_id,
        from,
        gas_per_pubdata,
        paymaster,
        paymaster_input,
    })
}

fn word(a: Address) -> U256 {
    U256::from_be_slice(a.as_slice())
}

impl Decoded {
    /// The EIP-712 digest its sender signed.
    pub fn signing_hash(&self) -> B256 {
        let domain = eip712_domain! {
            name: "zkSync",
            version: "2",
            chain_id: self.chain_id,
        };
        Transaction {
            txType: U256::from(0x71),
            from: word(self.from),
            to: word(self.to),
            gasLimit: U256::from(self.gas_limit),
            gasPerPubdataByteLimit: self.gas_per_pubdata,
            maxFeePerGas: U256::from(self.max_fee_per_gas),
            maxPriorityFeePerGas: U256::from(self.max_priority_fee_per_gas),
            paymaster: word(self.paymaster),
            nonce: U256::from(self.nonce),
            value: self.value,
            data: self.data.clone(),
            factoryDeps: vec![],
            paymasterInput: self.paymaster_input.clone(),
        }
        .eip712_signing_hash(&domain)
    }

    /// zkSync's transaction hash: keccak(digest || keccak(signature)).
    pub fn hash(&self) -> B256 {
        let mut both = [0u8; 64];
        both[..32].copy_from_slice(self.signing_hash().as_slice());
        both[32..].copy_from_slice(keccak256(self.signature.as_bytes()).as_slice());
        keccak256(both)
    }
}

struct State {
    anvil: String,
    chain_id: u64,
    http: reqwest::Client,
    /// 0x71 hash → the hash of the call as anvil ran it.
    hashes: Mutex<HashMap<B256, B256>>,
    /// Every 0x71 transaction accepted, in order.
    accepted: Mutex<Vec<Decoded>>,
    /// Why transactions were refused.
    refused: Mutex<Vec<String>>,
}

/// The endpoint (stops when dropped).
pub struct ZksyncNode {
    pub url: String,
    state: Arc<State>,
    handle: actix_web::dev::ServerHandle,
}

impl ZksyncNode {
    /// Serves on a random loopback port in front of the anvil at `anvil`.
    pub async fn start(anvil: &str, chain_id: u64) -> ZksyncNode {
        let state = Arc::new(State {
            anvil: anvil.to_owned(),
            chain_id,
            http: reqwest::Client::new(),
            hashes: Mutex::new(HashMap::new()),
            accepted: Mutex::new(Vec::new()),
            refused: Mutex::new(Vec::new()),
        });
        // The bootloader calls the paymaster and receives its payment.
        rpc(&state, "anvil_impersonateAccount", json!([BOOTLOADER]))
            .await
            .unwrap();
        rpc(
            &state,
            "anvil_setBalance",
            json!([BOOTLOADER, "0xde0b6b3a7640000"]),
        )
        .await
        .unwrap();
        let shared = web::Data::from(state.clone());
        let server = HttpServer::new(move || {
            App::new()
                .app_data(shared.clone())
                .app_data(web::JsonConfig::default().limit(1 << 20))
                .route("/", web::post().to(handle))
        })
        .workers(1)
        .bind(("127.0.0.1", 0))
        .unwrap();
        let port = server.addrs()[0].port();
        let server = server.run();
        let handle = server.handle();
        actix_rt::spawn(server);
        ZksyncNode {
            url: format!("http://127.0.0.1:{port}"),
            state,
            handle,
        }
    }

    /// The 0x71 transactions accepted so far.
    pub fn accepted(&self) -> Vec<Decoded> {
        self.state.accepted.lock().unwrap().clone()
    }

    /// Why transactions were refused.
    pub fn refused(&self) -> Vec<String> {
        self.state.refused.lock().unwrap().clone()
    }

    /// Other 0x71 senders than the platform are refused (the paymaster's allow list).
    pub async fn stop(self) {
        self.handle.stop(true).await;
    }
}

async fn rpc(state: &State, method: &str, params: Value) -> Result<Value, Value> {
    let reply: Value = state
        .http
        .post(&state.anvil)
        .json(&json!({"jsonrpc": "2.0", "id": 1, "method": method, "params": params}))
        .send()
        .await
        .map_err(|e| json!({"code": -32603, "message": e.to_string()}))?
        .json()
        .await
        .map_err(|e| json!({"code": -32603, "message": e.to_string()}))?;
    match reply.get("error") {
        Some(error) => Err(error.clone()),
        None => Ok(reply["result"].clone()),
    }
}

fn quantity(v: impl std::fmt::LowerHex) -> String {
    format!("{v:#x}")
}

async fn handle(state: web::Data<State>, body: web::Json<Value>) -> HttpResponse {
    let id = body.get("id").cloned().unwrap_or(Value::Null);
    let method = body["method"].as_str().unwrap_or_default().to_owned();
    let params = body.get("params").cloned().unwrap_or(json!([]));
    let result = match method.as_str() {
        "zks_estimateFee" => estimate_fee(&state, &params).await,
        "eth_sendRawTransaction" => send_raw(&state, &params).await,
        "eth_getTransactionReceipt" => receipt(&state, &params).await,
        _ => rpc(&state, &method, params).await,
    };
    HttpResponse::Ok().json(match result {
        Ok(result) => json!({"jsonrpc": "2.0", "id": id, "result": result}),
        Err(error) => json!({"jsonrpc": "2.0", "id": id, "error": error}),
    })
}

fn invalid(message: String) -> Value {
    json!({"code": -32602, "message": message})
}

async fn estimate_fee(state: &State, params: &Value) -> Result<Value, Value> {
    let request = &params[0];
    let meta = &request["eip712Meta"];
    let input = meta["paymasterParams"]["paymasterInput"]
        .as_array()
        .ok_or_else(|| invalid("paymasterInput must be an array of bytes".into()))?;
    if input.is_empty() || meta["gasPerPubdata"].as_str().is_none() {
        return Err(invalid("eip712Meta is incomplete".into()));
    }
    let data = request
        .get("input")
        .or_else(|| request.get("data"))
        .cloned()
        .unwrap_or(json!("0x"));
    let gas = rpc(
        state,
        "eth_estimateGas",
        json!([{"from": request["from"], "to": request["to"], "data": data}]),
    )
    .await?;
    let price = rpc(state, "eth_gasPrice", json!([])).await?;
    let price = u128::from_str_radix(price.as_str().unwrap_or("0x0").trim_start_matches("0x"), 16)
        .unwrap_or(0);
    Ok(json!({
        "gas_limit": gas,
        // Not the default (50,000) the request carries: the adapter must use this.
        "gas_per_pubdata_limit": quantity(800u64),
        "max_fee_per_gas": quantity(price * 2),
        "max_priority_fee_per_gas": "0x0",
    }))
}

async fn send_raw(state: &State, params: &Value) -> Result<Value, Value> {
    let raw = params[0].as_str().unwrap_or_default();
    let bytes = alloy::primitives::hex::decode(raw).map_err(|_| invalid("not hex".into()))?;
    if bytes.first() != Some(&0x71) {
        return rpc(state, "eth_sendRawTransaction", params.clone()).await;
    }
    match accept(state, &bytes).await {
        Ok(hash) => Ok(json!(hash)),
        Err(error) => {
            state
                .refused
                .lock()
                .unwrap()
                .push(error["message"].as_str().unwrap_or_default().to_owned());
            Err(error)
        }
    }
}

async fn accept(state: &State, bytes: &[u8]) -> Result<B256, Value> {
    let tx = decode(bytes).map_err(invalid)?;
    if tx.chain_id != state.chain_id {
        return Err(invalid(format!("wrong chain id {}", tx.chain_id)));
    }
    let signer = tx
        .signature
        .recover_address_from_prehash(&tx.signing_hash())
        .map_err(|_| invalid("invalid signature".into()))?;
    if signer != tx.from {
        return Err(invalid(format!(
            "signature of {signer} on a transaction from {}",
            tx.from
        )));
    }
    let next = rpc(state, "eth_getTransactionCount", json!([tx.from, "latest"])).await?;
    let next = u64::from_str_radix(next.as_str().unwrap_or("0x0").trim_start_matches("0x"), 16)
        .unwrap_or(0);
    if tx.nonce != next {
        return Err(
            json!({"code": 3, "message": format!("nonce mismatch: expected {next}, got {}", tx.nonce)}),
        );
    }
    let hash = tx.hash();
    // The bootloader asks the paymaster to validate and pay.
    let call = chain_adapter::chain::Paymaster::validateAndPayForPaymasterTransactionCall {
        _0: hash,
        _1: tx.signing_hash(),
        transaction: chain_adapter::chain::Paymaster::Transaction {
            txType: U256::from(0x71),
            from: word(tx.from),
            to: word(tx.to),
            gasLimit: U256::from(tx.gas_limit),
            gasPerPubdataByteLimit: tx.gas_per_pubdata,
            maxFeePerGas: U256::from(tx.max_fee_per_gas),
            maxPriorityFeePerGas: U256::from(tx.max_priority_fee_per_gas),
            paymaster: word(tx.paymaster),
            nonce: U256::from(tx.nonce),
            value: tx.value,
            reserved: [U256::ZERO; 4],
            data: tx.data.clone(),
            signature: Bytes::from(tx.signature.as_bytes().to_vec()),
            factoryDeps: vec![],
            paymasterInput: tx.paymaster_input.clone(),
            reservedDynamic: Bytes::new(),
        },
    };
    let validation = json!({
        "from": BOOTLOADER,
        "to": tx.paymaster,
        "data": Bytes::from(call.abi_encode()),
        "gas": quantity(1_000_000u64),
    });
    rpc(state, "eth_call", json!([validation.clone(), "latest"]))
        .await
        .map_err(|e| {
            json!({"code": 3, "message": format!("failed paymaster validation: {}", e["message"])})
        })?;
    let paid = rpc(state, "eth_sendTransaction", json!([validation])).await?;
    wait_mined(state, &paid).await?;
    // The call runs as its sender (the paymaster paid; the sender is lent the gas).
    rpc(state, "anvil_impersonateAccount", json!([tx.from])).await?;
    let balance = rpc(state, "eth_getBalance", json!([tx.from, "latest"])).await?;
    rpc(
        state,
        "anvil_setBalance",
        json!([
            tx.from,
            quantity(
                U256::from(tx.gas_limit) * U256::from(tx.max_fee_per_gas)
                    + U256::from(10u64.pow(18))
            )
        ]),
    )
    .await?;
    let ran = rpc(
        state,
        "eth_sendTransaction",
        json!([{
            "from": tx.from,
            "to": tx.to,
            "data": tx.data,
            "gas": quantity(tx.gas_limit),
            "nonce": quantity(tx.nonce),
        }]),
    )
    .await?;
    wait_mined(state, &ran).await?;
    rpc(state, "anvil_setBalance", json!([tx.from, balance])).await?;
    let ran: B256 = serde_json::from_value(ran).map_err(|e| invalid(e.to_string()))?;
    state.hashes.lock().unwrap().insert(hash, ran);
    state.accepted.lock().unwrap().push(tx);
    Ok(hash)
}

async fn wait_mined(state: &State, hash: &Value) -> Result<(), Value> {
    for _ in 0..200 {
        if !rpc(state, "eth_getTransactionReceipt", json!([hash]))
            .await?
            .is_null()
        {
            return Ok(());
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    Err(invalid("not mined".into()))
}

async fn receipt(state: &State, params: &Value) -> Result<Value, Value> {
    let asked: Option<B256> = serde_json::from_value(params[0].clone()).ok();
    let ran = asked.and_then(|h| state.hashes.lock().unwrap().get(&h).copied());
    let (Some(asked), Some(ran)) = (asked, ran) else {
        return rpc(state, "eth_getTransactionReceipt", params.clone()).await;
    };
    let mut receipt = rpc(state, "eth_getTransactionReceipt", json!([ran])).await?;
    if let Some(fields) = receipt.as_object_mut() {
        fields.insert("transactionHash".into(), json!(asked));
        fields.insert("type".into(), json!("0x71"));
    }
    Ok(receipt)
}
