"""Banking77 intent classification: a single-step classifier and a label-match metric.

Sweeps load these by path (``pipelines.banking77:Classify``,
``pipelines.banking77:intent_match``) against the Banking77 corpus built by
``python datasets/build.py banking77`` (columns text, intent, split).
"""

from typing import Literal

import dspy

# The 77 labels exactly as upstream's categories.json spells them, including its
# quirks ("Refund_not_showing_up", "reverted_card_payment?"), because the
# corpus labels use the same spelling.
INTENTS: tuple[str, ...] = (
    "card_arrival",
    "card_linking",
    "exchange_rate",
    "card_payment_wrong_exchange_rate",
    "extra_charge_on_statement",
    "pending_cash_withdrawal",
    "fiat_currency_support",
    "card_delivery_estimate",
    "automatic_top_up",
    "card_not_working",
    "exchange_via_app",
    "lost_or_stolen_card",
    "age_limit",
    "pin_blocked",
    "contactless_not_working",
    "top_up_by_bank_transfer_charge",
    "pending_top_up",
    "cancel_transfer",
    "top_up_limits",
    "wrong_amount_of_cash_received",
    "card_payment_fee_charged",
    "transfer_not_received_by_recipient",
    "supported_cards_and_currencies",
    "getting_virtual_card",
    "card_acceptance",
    "top_up_reverted",
    "balance_not_updated_after_cheque_or_cash_deposit",
    "card_payment_not_recognised",
    "edit_personal_details",
    "why_verify_identity",
    "unable_to_verify_identity",
    "get_physical_card",
    "visa_or_mastercard",
    "topping_up_by_card",
    "disposable_card_limits",
    "compromised_card",
    "atm_support",
    "direct_debit_payment_not_recognised",
    "passcode_forgotten",
    "declined_cash_withdrawal",
    "pending_card_payment",
    "lost_or_stolen_phone",
    "request_refund",
    "declined_transfer",
    "Refund_not_showing_up",
    "declined_card_payment",
    "pending_transfer",
    "terminate_account",
    "card_swallowed",
    "transaction_charged_twice",
    "verify_source_of_funds",
    "transfer_timing",
    "reverted_card_payment?",
    "change_pin",
    "beneficiary_not_allowed",
    "transfer_fee_charged",
    "receiving_money",
    "failed_transfer",
    "transfer_into_account",
    "verify_top_up",
    "getting_spare_card",
    "top_up_by_cash_or_cheque",
    "order_physical_card",
    "virtual_card_not_working",
    "wrong_exchange_rate_for_cash_withdrawal",
    "get_disposable_virtual_card",
    "top_up_failed",
    "balance_not_updated_after_bank_transfer",
    "cash_withdrawal_not_recognised",
    "exchange_charge",
    "top_up_by_card_charge",
    "activate_my_card",
    "cash_withdrawal_charge",
    "card_about_to_expire",
    "apple_pay_or_google_pay",
    "verify_my_identity",
    "country_support",
)


class ClassifyIntent(dspy.Signature):
    """Classify the online-banking customer message into exactly one of the 77 Banking77 intents.

    Answer with one label from the list given for the intent field, spelled exactly as listed.
    """

    text: str = dspy.InputField()
    # A Literal puts all 77 labels in the prompt and rejects anything else when
    # parsing, and, unlike labels written into the instructions, it survives
    # optimizers that rewrite the instructions.
    intent: Literal[INTENTS] = dspy.OutputField()


class Classify(dspy.Module):
    """Predict the intent directly, without a reasoning step."""

    def __init__(self) -> None:
        super().__init__()
        self.classify = dspy.Predict(ClassifyIntent)

    def forward(self, text: str) -> dspy.Prediction:
        return self.classify(text=text)


def _canonical(label: object) -> str:
    return " ".join(str(label).split()).casefold()


def intent_match(example: dspy.Example, prediction: dspy.Prediction, trace: object = None) -> bool:
    """Metric: the predicted intent equals the labelled one, ignoring case and whitespace."""
    return _canonical(example.intent) == _canonical(prediction.intent)
