// The payload filter: rows of (key, operator, value) that become the request's `where` object (Mongo-like:
// a bare value is $eq; several rows are joined by $and). Keys are offered from /v1/index/payload-keys and from
// the payloads of the hits seen so far.

import { $, el, bilingual } from "./dom.js";
import { PageError } from "./api.js";

const OPERATORS = [
  ["$eq", "= 等于 equals"],
  ["$ne", "≠ 不等于 not equal"],
  ["$gt", "> 大于 greater"],
  ["$gte", "≥ 不小于 at least"],
  ["$lt", "< 小于 less"],
  ["$lte", "≤ 不大于 at most"],
  ["$in", "属于 in (a, b, …)"],
  ["$nin", "不属于 not in (a, b, …)"],
  ["$exists", "存在 exists"],
  ["!$exists", "不存在 missing"],
];

const known = new Map(); // key -> {types: Set, examples: Set}
let rowCount = 0;

/** A value typed in the field: JSON when it parses to a scalar (700 is a number, true a boolean, "700" a
 *  string), else the text itself. */
function parseValue(text) {
  const trimmed = text.trim();
  try {
    const value = JSON.parse(trimmed);
    if (value === null || ["number", "string", "boolean"].includes(typeof value)) return value;
  } catch (_) {
    // plain text: a string value
  }
  return trimmed;
}

function parseList(text) {
  return text.split(/[,，]/).map((part) => part.trim()).filter((part) => part !== "").map(parseValue);
}

function condition(row) {
  const key = row.querySelector(".filter-key").value.trim();
  if (!key) return null;
  const op = row.querySelector(".filter-op").value;
  const text = row.querySelector(".filter-value").value;
  if (op === "$exists") return { [key]: { $exists: true } };
  if (op === "!$exists") return { [key]: { $exists: false } };
  if (text.trim() === "") throw new PageError(null, `筛选 Filter “${key}”: 请输入值 type a value`);
  if (op === "$in" || op === "$nin") return { [key]: { [op]: parseList(text) } };
  if (op === "$eq") return { [key]: parseValue(text) };
  return { [key]: { [op]: parseValue(text) } };
}

/** The `where` object of the rows filled in, or undefined when none is. */
export function whereClause() {
  const conditions = [...document.querySelectorAll("#filter-rows .filter-row")].map(condition).filter(Boolean);
  if (conditions.length === 0) return undefined;
  return conditions.length === 1 ? conditions[0] : { $and: conditions };
}

function updateValueHints(row) {
  const entry = known.get(row.querySelector(".filter-key").value.trim());
  const list = row.querySelector("datalist");
  list.replaceChildren(...[...(entry ? entry.examples : [])].map((v) => el("option", { value: String(v) })));
}

function addRow(onChange) {
  const n = ++rowCount;
  const valueList = `filter-values-${n}`;
  const op = el("select", { class: "filter-op" }, ...OPERATORS.map(([value, text]) => el("option", { value }, text)));
  const key = el("input", { class: "filter-key", type: "text", autocomplete: "off", spellcheck: false });
  key.setAttribute("list", "payload-keys");
  const value = el("input", { class: "filter-value", type: "text", autocomplete: "off" });
  value.setAttribute("list", valueList);
  const remove = el("button", { type: "button", class: "filter-remove" }, ...bilingual("删除", "Remove"));
  const row = el("div", { class: "filter-row", dataset: { row: String(n) } },
    el("label", {}, ...bilingual("键", "key"), key),
    el("label", {}, ...bilingual("条件", "operator"), op),
    el("label", {}, ...bilingual("值", "value"), value),
    el("datalist", { id: valueList }), remove);
  key.addEventListener("input", () => updateValueHints(row));
  for (const field of [key, op, value]) field.addEventListener("change", onChange);
  remove.addEventListener("click", () => {
    row.remove();
    if ($("filter-rows").children.length === 0) addRow(onChange);
    onChange();
    $("filter-add").focus();
  });
  $("filter-rows").append(row);
  return row;
}

function renderKeys() {
  $("payload-keys").replaceChildren(...[...known.keys()].sort().map((key) => {
    const { types, examples } = known.get(key);
    const hint = [[...types].join("|"), [...examples].slice(0, 3).join(", ")].filter(Boolean).join(": ");
    return el("option", { value: key, label: hint ? `${key} (${hint})` : key });
  }));
}

function remember(key, type, example) {
  if (!known.has(key)) known.set(key, { types: new Set(), examples: new Set() });
  const entry = known.get(key);
  if (type) entry.types.add(type);
  if (example !== undefined && example !== null && typeof example !== "object" && entry.examples.size < 8) {
    entry.examples.add(example);
  }
}

/** Offer the keys of /v1/index/payload-keys (`[{key, types, examples}]`). */
export function offerKeys(keys) {
  for (const { key, types, examples } of keys) {
    for (const type of types || [null]) remember(key, type);
    for (const example of examples || []) remember(key, null, example);
  }
  renderKeys();
}

/** Offer the top-level keys (and scalar values) of the payloads of hits on screen. */
export function notePayloads(payloads) {
  for (const payload of payloads) {
    for (const [key, value] of Object.entries(payload || {})) remember(key, null, value);
  }
  renderKeys();
}

/** Start with one empty row; `onChange` runs when a row is changed or removed. */
export function setupFilters(onChange) {
  addRow(onChange);
  $("filter-add").addEventListener("click", () => addRow(onChange).querySelector(".filter-key").focus());
}
