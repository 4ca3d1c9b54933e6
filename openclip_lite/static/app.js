// The search page: it sends what the user gives to the JSON API and shows the answer. Everything it shows
// (results, scores, pages, errors) comes from the API; the page keeps only what was asked and which answer is shown.
"use strict";

const $ = (id) => document.getElementById(id);
// shown: the query, top K and page of the results on screen; the pager turns their pages, whatever the K box
// says now (a K typed without Enter is for the next search, not for these results)
const state = { query: null, shown: null, defaultK: 50, previewUrl: null };
let ticket = 0; // answers to anything but the latest request are dropped

async function callApi(url, options) {
  let response;
  try {
    response = await fetch(url, options);
  } catch (error) {
    throw new Error(`Could not reach the server (${error.message}). Is openclip-lite serve still running?`);
  }
  let body = null;
  try {
    body = await response.json();
  } catch (error) {
    body = null;
  }
  if (!response.ok) {
    const detail = body && typeof body.detail === "string" ? body.detail : `The server answered ${response.status} ${response.statusText}.`;
    throw new Error(detail);
  }
  if (body === null) throw new Error("The server's answer was not JSON.");
  return body;
}

// k: the top K as typed, or "" to leave it to the server's default (both searches take an absent k alike)
function request(query, page, k) {
  if (query.text !== undefined) {
    const params = new URLSearchParams({ q: query.text, page });
    if (k) params.set("k", k);
    return callApi(`api/search?${params}`);
  }
  const form = new FormData();
  form.append("image", query.file, query.file.name || "pasted image");
  if (k) form.append("k", k);
  form.append("page", page);
  return callApi("api/search", { method: "POST", body: form });
}

// the K box's value; a number box reads "" both when empty (the default K) and when what is typed is no number
function typedK() {
  if ($("k").validity.badInput) throw new Error("The number of results (top K) is not a number: type a whole number, or leave it empty for the default.");
  return $("k").value.trim();
}

async function search(query, page, k) {
  const mine = ++ticket;
  state.query = query;
  document.body.dataset.state = "loading";
  $("results").setAttribute("aria-busy", "true");
  try {
    const answer = await request(query, page, k === undefined ? typedK() : k);
    if (mine === ticket) {
      state.shown = { query, k: answer.k, page: answer.page };
      showAnswer(answer);
    }
  } catch (error) {
    if (mine === ticket) showError(error.message);
  }
}

function turnPage(by) {
  if (state.shown) search(state.shown.query, state.shown.page + by, state.shown.k);
}

function showAnswer(answer) {
  const pagerHadFocus = $("pager").contains(document.activeElement);
  $("error").hidden = true;
  $("error").textContent = "";
  const what = answer.query.text !== undefined ? `“${answer.query.text}”` : `images like ${answer.query.image}`;
  const count = answer.total === 1 ? "1 result" : `${answer.total} results`;
  $("status").textContent = answer.total ? `${count} for ${what}, page ${answer.page} of ${answer.pages}` : `No results for ${what}: the index is empty.`;
  $("results").replaceChildren(...answer.results.map(resultItem));
  $("pager").hidden = answer.pages <= 1;
  $("page-label").textContent = `Page ${answer.page} of ${answer.pages}`;
  $("prev").disabled = answer.page <= 1;
  $("next").disabled = answer.page >= answer.pages;
  if ($("k").value.trim() === "" && !$("k").validity.badInput) $("k").value = answer.k; // an empty K was the default: show it
  if (pagerHadFocus && (document.activeElement.disabled || !$("pager").contains(document.activeElement))) {
    (answer.page > 1 ? $("prev") : $("next")).focus(); // a button that was just disabled keeps no focus
  }
  finish("done");
}

function resultItem(result) {
  const item = document.createElement("li");
  item.className = "result";
  item.dataset.id = result.id;
  const figure = document.createElement("figure");
  const image = document.createElement("img");
  image.src = result.thumb;
  image.alt = result.name;
  image.loading = "lazy";
  const caption = document.createElement("figcaption");
  const rank = document.createElement("span");
  rank.className = "rank";
  rank.textContent = `#${result.rank}`;
  const score = document.createElement("span");
  score.className = "score";
  score.textContent = result.score.toFixed(3);
  score.title = "cosine similarity";
  const name = document.createElement("span");
  name.className = "name";
  name.textContent = result.name;
  caption.append(rank, " ", score, " ", name);
  figure.append(image, caption);
  item.append(figure);
  return item;
}

function showError(message) {
  state.shown = null;
  $("error").textContent = message;
  $("error").hidden = false;
  $("status").textContent = "";
  $("results").replaceChildren();
  $("pager").hidden = true;
  finish("error");
}

function finish(how) {
  $("results").removeAttribute("aria-busy");
  document.body.dataset.state = how;
  document.body.dataset.answers = String(Number(document.body.dataset.answers || 0) + 1);
}

function searchImage(file) {
  if (state.previewUrl) URL.revokeObjectURL(state.previewUrl);
  state.previewUrl = URL.createObjectURL(file);
  $("preview").src = state.previewUrl;
  $("preview").alt = `your image: ${file.name || "pasted image"}`;
  $("preview").hidden = false;
  $("q").value = "";
  search({ file }, 1);
}

function reset() {
  ticket++; // an answer still on its way is not shown
  state.query = null;
  state.shown = null;
  $("q").value = "";
  $("image").value = "";
  $("k").value = state.defaultK;
  if (state.previewUrl) URL.revokeObjectURL(state.previewUrl);
  state.previewUrl = null;
  $("preview").hidden = true;
  $("preview").removeAttribute("src");
  $("error").hidden = true;
  $("error").textContent = "";
  $("status").textContent = "";
  $("results").replaceChildren();
  $("results").removeAttribute("aria-busy");
  $("pager").hidden = true;
  document.body.dataset.state = "idle";
  $("q").focus();
}

async function showInfo() {
  try {
    const info = await callApi("api/info");
    state.defaultK = info.default_k;
    $("k").value = info.default_k;
    $("k").max = info.max_k;
    $("q").maxLength = info.max_query_chars;
    const images = info.count === 1 ? "1 image" : `${info.count.toLocaleString()} images`;
    $("info").textContent = `${images}, model ${info.model || "(unnamed)"}`;
  } catch (error) {
    $("info").textContent = "";
    showError(error.message);
  }
}

function firstFile(transfer) {
  return transfer && transfer.files && transfer.files.length ? transfer.files[0] : null;
}

document.addEventListener("DOMContentLoaded", () => {
  $("text-form").addEventListener("submit", (event) => {
    event.preventDefault();
    if (state.previewUrl) URL.revokeObjectURL(state.previewUrl);
    state.previewUrl = null;
    $("preview").hidden = true;
    $("image").value = "";
    search({ text: $("q").value }, 1);
  });
  $("image").addEventListener("change", () => {
    const file = $("image").files[0];
    $("image").value = ""; // so that choosing the same file again is a change too, and searches again
    if (file) searchImage(file);
  });
  $("k").addEventListener("keydown", (event) => {
    if (event.key === "Enter" && state.query) search(state.query, 1); // a new top K: search again
  });
  $("prev").addEventListener("click", () => turnPage(-1));
  $("next").addEventListener("click", () => turnPage(+1));
  $("reset").addEventListener("click", reset);

  const drop = $("drop");
  drop.addEventListener("keydown", (event) => {
    if (event.key === "Enter" || event.key === " ") {
      event.preventDefault();
      $("image").click();
    }
  });
  drop.addEventListener("click", () => $("image").click());
  // a drop anywhere on the page is a query; without this the browser would leave the page to open the file
  document.addEventListener("dragover", (event) => {
    event.preventDefault();
    drop.classList.add("over");
  });
  document.addEventListener("dragleave", (event) => {
    if (!event.relatedTarget) drop.classList.remove("over");
  });
  document.addEventListener("drop", (event) => {
    event.preventDefault();
    drop.classList.remove("over");
    const file = firstFile(event.dataTransfer);
    if (file) searchImage(file);
    else showError("What was dropped holds no file: drop an image file.");
  });
  document.addEventListener("paste", (event) => {
    const file = firstFile(event.clipboardData);
    if (!file) return; // pasted text goes where it was pasted
    event.preventDefault();
    searchImage(file);
  });

  showInfo();
});
