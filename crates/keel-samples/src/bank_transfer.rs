//! `BankTransfer`: a critical section over two `Account` entities. The orchestration
//! locks both accounts (in a global order, so two transfers never deadlock), checks the
//! source balance and moves the money; while it holds the locks no other operation
//! touches either account, so money is never created or destroyed.
//!
//! `Account` state: the balance (a number). Operations: `deposit` and `withdraw` (a
//! positive amount; a withdrawal beyond the balance fails with `InsufficientFunds`),
//! `balance`.
//!
//! Input: `{"from":"alice","to":"bob","amount":30}` (account keys). Output:
//! `{"transferred":true,"fromBalance":…,"toBalance":…}`, or `transferred: false` when the
//! source does not hold the amount.

use keel::{
    EntityContext, EntityError, EntityId, Orchestration, OrchestrationContext, OrchestrationError, WorkerBuilder,
};
use serde::{Deserialize, Serialize};

/// The entity's name.
pub const ACCOUNT: &str = "Account";

pub const BANK_TRANSFER: Orchestration<Transfer, TransferResult> = Orchestration::new("BankTransfer");

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Transfer {
    pub from: String,
    pub to: String,
    pub amount: i64,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TransferResult {
    pub transferred: bool,
    pub from_balance: i64,
    pub to_balance: i64,
}

/// Registers the `Account` entity and the `BankTransfer` orchestrator.
pub fn register(worker: WorkerBuilder) -> WorkerBuilder {
    worker.entity(ACCOUNT, account).orchestration(BANK_TRANSFER, bank_transfer)
}

/// One operation on an account; returns the balance after it.
pub fn account(ctx: &mut EntityContext<i64>) -> Result<i64, EntityError> {
    match ctx.operation() {
        "deposit" | "withdraw" => {
            let amount: i64 = ctx.input()?;
            if amount <= 0 {
                return Err(EntityError::new("InvalidAmount", format!("the amount must be positive, not {amount}")));
            }
            let withdraw = ctx.operation() == "withdraw";
            let balance = ctx.state_mut();
            if withdraw && *balance < amount {
                return Err(EntityError::new(
                    "InsufficientFunds",
                    format!("the balance is {balance}, less than {amount}"),
                ));
            }
            *balance += if withdraw { -amount } else { amount };
        }
        "balance" => {}
        _ => return Err(ctx.unknown_operation()),
    }
    Ok(ctx.state().copied().unwrap_or_default())
}

/// The orchestrator: lock both accounts, then withdraw and deposit inside the lock.
pub async fn bank_transfer(
    ctx: OrchestrationContext,
    transfer: Transfer,
) -> Result<TransferResult, OrchestrationError> {
    if transfer.from == transfer.to {
        return Err(OrchestrationError::new("InvalidTransfer", "the source and the target are the same account"));
    }
    let account =
        |key: &str| EntityId::new(ACCOUNT, key).map_err(|message| OrchestrationError::new("InvalidTransfer", message));
    let (from, to) = (account(&transfer.from)?, account(&transfer.to)?);
    let _locked = ctx.lock_entities([&from, &to]).await?;
    let balance: i64 = ctx.call_entity(&from, "balance", &()).await?;
    if balance < transfer.amount {
        let to_balance: i64 = ctx.call_entity(&to, "balance", &()).await?;
        return Ok(TransferResult { transferred: false, from_balance: balance, to_balance });
    }
    let from_balance: i64 = ctx.call_entity(&from, "withdraw", &transfer.amount).await?;
    let to_balance: i64 = ctx.call_entity(&to, "deposit", &transfer.amount).await?;
    Ok(TransferResult { transferred: true, from_balance, to_balance })
}
