//! `example/cart` and `example/stock`: a shopping cart, modelled on StateFun's
//! shopping-cart example.
//!
//! - Send `example/AddToCart {"item", "quantity", "checkout_timeout_ms"?}` (JSON) to
//!   `example/cart/<user>`: the cart asks `example/stock/<item>` to reserve the quantity; the
//!   stock replies `example/ItemAvailability` and the cart adds what was reserved. The first
//!   add schedules a delayed `example/CheckoutTimeout` (default 15 minutes) with the
//!   cancellation token `checkout-timeout`.
//! - Call `example/cart/<user>` with `example/Checkout {}`: cancels the timeout, publishes a
//!   receipt (`example/Receipt`) to the egress topic `receipts`, empties the cart and replies
//!   the receipt.
//! - When the timeout fires first, reserved items go back to stock and the cart empties.
//! - Call `example/cart/<user>` with `example/ViewCart {}` to get the cart as JSON.
//! - Send `example/Restock {"quantity"}` (or a plain `long`) to `example/stock/<item>` to add
//!   stock; it replies the new quantity.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use statemesh_sdk::{Address, FnFunction, FunctionError, Json, TypeName, TypedValue, ValueSpec};

/// The cart function type.
pub const CART_TYPE: &str = "example/cart";
/// The stock function type.
pub const STOCK_TYPE: &str = "example/stock";
/// Egress topic of receipts.
pub const RECEIPTS_TOPIC: &str = "receipts";
const TIMEOUT_TOKEN: &str = "checkout-timeout";
const DEFAULT_CHECKOUT_TIMEOUT_MS: u64 = 15 * 60 * 1000;

/// Add an item to a cart.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct AddToCart {
    /// Item id (the stock address id).
    pub item: String,
    /// How many.
    pub quantity: i64,
    /// Abandon the cart this long after its first item (default 15 minutes).
    #[serde(default)]
    pub checkout_timeout_ms: Option<u64>,
}

/// Stock's answer to a reservation.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ItemAvailability {
    /// Item id.
    pub item: String,
    /// Reserved quantity (0 if out of stock).
    pub quantity: i64,
    /// Whether the reservation succeeded.
    pub in_stock: bool,
}

/// A reservation request to stock.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct RequestItem {
    /// How many.
    pub quantity: i64,
}

/// Add stock.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Restock {
    /// How many.
    pub quantity: i64,
}

/// A completed checkout.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Receipt {
    /// The user (cart id).
    pub user: String,
    /// Items and quantities.
    pub items: BTreeMap<String, i64>,
}

fn t(s: &str) -> TypeName {
    TypeName::parse(s).expect("valid literal type")
}

fn decode<T: serde::de::DeserializeOwned + Serialize>(
    msg: &TypedValue,
) -> Result<T, FunctionError> {
    Ok(msg.decode::<Json<T>>()?.0)
}

/// The cart function.
pub fn cart_function() -> FnFunction {
    let basket = ValueSpec::<Json<BTreeMap<String, i64>>>::custom("basket", "example/Basket");
    let timeout_pending = ValueSpec::<bool>::new("timeout_pending");
    let specs = vec![
        basket.descriptor().clone(),
        timeout_pending.descriptor().clone(),
    ];
    FnFunction::new(specs, move |ctx, msg| {
        let me = ctx.self_address().clone();
        let mut items = ctx.get(&basket)?.map(|j| j.0).unwrap_or_default();
        match msg.typename() {
            "example/AddToCart" => {
                let add: AddToCart = decode(msg)?;
                if add.quantity <= 0 {
                    return Err(FunctionError::msg(format!(
                        "AddToCart: expected a positive quantity, found {}",
                        add.quantity
                    )));
                }
                let stock =
                    Address::new(t(STOCK_TYPE), add.item.clone()).map_err(FunctionError::msg)?;
                ctx.send(
                    stock,
                    TypedValue::with_type(
                        "example/RequestItem",
                        &Json(RequestItem {
                            quantity: add.quantity,
                        }),
                    ),
                );
                if !ctx.get(&timeout_pending)?.unwrap_or(false) {
                    let delay = Duration::from_millis(
                        add.checkout_timeout_ms
                            .unwrap_or(DEFAULT_CHECKOUT_TIMEOUT_MS),
                    );
                    ctx.send_after(
                        delay,
                        me,
                        TypedValue::with_type("example/CheckoutTimeout", &Json(())),
                        Some(TIMEOUT_TOKEN.into()),
                    );
                    ctx.set(&timeout_pending, &true)?;
                }
            }
            "example/ItemAvailability" => {
                let a: ItemAvailability = decode(msg)?;
                if a.in_stock {
                    *items.entry(a.item).or_insert(0) += a.quantity;
                    ctx.set(&basket, &Json(items))?;
                }
            }
            "example/Checkout" => {
                if ctx.get(&timeout_pending)?.unwrap_or(false) {
                    ctx.cancel_delayed(TIMEOUT_TOKEN);
                    ctx.remove(&timeout_pending)?;
                }
                let receipt = TypedValue::with_type(
                    "example/Receipt",
                    &Json(Receipt {
                        user: me.id.to_string(),
                        items,
                    }),
                );
                ctx.send_egress(RECEIPTS_TOPIC, receipt.clone());
                ctx.remove(&basket)?;
                ctx.reply(receipt);
            }
            "example/CheckoutTimeout" => {
                for (item, quantity) in items {
                    let stock = Address::new(t(STOCK_TYPE), item).map_err(FunctionError::msg)?;
                    ctx.send(
                        stock,
                        TypedValue::with_type("example/Restock", &Json(Restock { quantity })),
                    );
                }
                ctx.remove(&basket)?;
                ctx.remove(&timeout_pending)?;
            }
            "example/ViewCart" => {
                ctx.reply(TypedValue::with_type("example/Basket", &Json(items)));
            }
            // Stock's answer to a `Restock` sent when the checkout timed out (its new
            // quantity): nothing left to do.
            "io.statefun.types/long" if ctx.caller().is_some_and(|c| c.typ == t(STOCK_TYPE)) => {}
            other => {
                return Err(FunctionError::msg(format!(
                    "example/cart: unexpected message type {other:?}"
                )))
            }
        }
        Ok(())
    })
}

/// The stock function.
pub fn stock_function() -> FnFunction {
    let quantity = ValueSpec::<i64>::new("quantity");
    FnFunction::new(vec![quantity.descriptor().clone()], move |ctx, msg| {
        let have = ctx.get(&quantity)?.unwrap_or(0);
        match msg.typename() {
            "example/Restock" | "io.statefun.types/long" => {
                let r: Restock = if msg.is::<i64>() {
                    Restock {
                        quantity: msg.get()?,
                    }
                } else {
                    decode(msg)?
                };
                ctx.set(&quantity, &(have + r.quantity))?;
                ctx.reply(TypedValue::of(&(have + r.quantity)));
            }
            "example/RequestItem" => {
                let r: RequestItem = decode(msg)?;
                let item = ctx.self_address().id.to_string();
                let in_stock = have >= r.quantity;
                if in_stock {
                    ctx.set(&quantity, &(have - r.quantity))?;
                }
                let a = ItemAvailability {
                    item,
                    quantity: if in_stock { r.quantity } else { 0 },
                    in_stock,
                };
                ctx.reply(TypedValue::with_type("example/ItemAvailability", &Json(a)));
            }
            other => {
                return Err(FunctionError::msg(format!(
                    "example/stock: unexpected message type {other:?}"
                )))
            }
        }
        Ok(())
    })
}
