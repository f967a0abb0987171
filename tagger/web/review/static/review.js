// Keyboard shortcuts and in-place decisions for the review page. The forms work without this file;
// with it, decisions are posted with fetch and only the decided tag is redrawn.
(function () {
  "use strict";
  const csrf = (document.querySelector('meta[name="csrf-token"]') || {}).content || "";
  let focused = null;

  function toast(text, isError) {
    const box = document.createElement("div");
    box.className = "toast" + (isError ? " error" : "");
    box.setAttribute("role", "status");
    box.textContent = text;
    document.body.appendChild(box);
    setTimeout(() => box.remove(), isError ? 6000 : 1800);
  }

  // What j/k walk through: tags the filter selected on the queue, pairs on the duplicates page.
  function targets() {
    return Array.from(document.querySelectorAll(".item.matched, .pair"));
  }

  function focusOn(element) {
    if (focused) focused.classList.remove("focused");
    focused = element || null;
    if (focused) {
      focused.classList.add("focused");
      focused.scrollIntoView({ block: "nearest" });
    }
  }

  function move(step) {
    const list = targets();
    if (!list.length) return;
    const index = list.indexOf(focused);
    const next = index < 0 ? 0 : Math.min(list.length - 1, Math.max(0, index + step));
    focusOn(list[next]);
  }

  function nextUndecided(after) {
    const list = targets();
    const start = list.indexOf(after);
    for (let i = start + 1; i < list.length; i++) {
      const state = list[i].dataset.state;
      if (state === "pending" || state === "accepted" || (list[i].classList.contains("pair") && !list[i].classList.contains("decided"))) {
        return list[i];
      }
    }
    return list[start] || list[0];
  }

  async function post(form, submitter) {
    const body = new URLSearchParams(new FormData(form, submitter));
    // getAttribute: the form has an input named "action", which form.action would return.
    const response = await fetch(form.getAttribute("action"), {
      method: "POST", body: body, credentials: "same-origin",
      headers: { "Accept": "application/json", "X-CSRF-Token": csrf },
    });
    let data = {};
    try { data = await response.json(); } catch (e) { data = { detail: "the server answered " + response.status }; }
    if (!response.ok) throw new Error(data.detail || ("the server answered " + response.status));
    return data;
  }

  async function onDecide(event) {
    const form = event.target;
    event.preventDefault();
    const item = form.closest(".item");
    try {
      const data = await post(form, event.submitter);
      const holder = document.createElement("div");
      holder.innerHTML = data.html;
      const fresh = holder.firstElementChild;
      item.replaceWith(fresh);
      if (focused === item || !focused) {
        focused = fresh;
        focusOn(nextUndecided(fresh));
      }
      toast(data.changed ? (data.attribute + ": " + (data.chosen ? data.action + " " + data.chosen : "rejected")) : "already decided");
    } catch (error) {
      toast(error.message, true);
    }
  }

  async function onVerdict(event) {
    const form = event.target;
    event.preventDefault();
    const pair = form.closest(".pair");
    try {
      const data = await post(form, event.submitter);
      pair.classList.add("decided");
      pair.dataset.verdict = data.verdict;
      const result = pair.querySelector(".verdict-result");
      if (result) result.textContent = data.verdict === "same" ? "same product ✓" : "different ✗";
      form.remove();
      if (focused === pair || !focused) focusOn(nextUndecided(pair));
      toast(data.sku_a + " / " + data.sku_b + ": " + data.verdict);
    } catch (error) {
      toast(error.message, true);
    }
  }

  document.addEventListener("submit", (event) => {
    const form = event.target;
    if (form.matches("form.decide")) return onDecide(event);
    if (form.matches("form.verdict")) return onVerdict(event);
    const asking = form.querySelector("[data-confirm]");
    if (asking && !window.confirm(asking.dataset.confirm)) event.preventDefault();
  });

  function press(selector) {
    if (!focused) return false;
    const button = focused.querySelector(selector);
    if (!button) return false;
    button.form.requestSubmit(button);
    return true;
  }

  document.addEventListener("keydown", (event) => {
    if (event.ctrlKey || event.metaKey || event.altKey) return;
    const tag = (event.target.tagName || "").toLowerCase();
    if (tag === "input" || tag === "select" || tag === "textarea") {
      if (event.key === "Escape") event.target.blur();
      // Enter on the "another label" list applies the chosen label.
      if (event.key === "Enter" && tag === "select" && event.target.form && event.target.form.matches(".pick-other")) {
        event.preventDefault();
        event.target.form.requestSubmit(event.target.form.querySelector("button"));
      }
      return;
    }
    const key = event.key;
    let handled = true;
    if (key === "j" || key === "ArrowDown") move(1);
    else if (key === "k" || key === "ArrowUp") move(-1);
    else if (key === "a") handled = press('button.approve[data-key="a"]');
    else if (key === "r") handled = press('button.reject[data-key="r"]');
    else if (key === "s") handled = press('button[data-key="s"]');
    else if (key === "d") handled = press('button[data-key="d"]');
    else if (/^[1-9]$/.test(key)) handled = press('button.pick[data-key="' + key + '"]');
    else if (key === "o") {
      const select = focused && focused.querySelector(".pick-other select");
      if (select) select.focus(); else handled = false;
    } else if (key === "w") {
      const link = focused && focused.querySelector("a.why");
      if (link) window.location.href = link.href; else handled = false;
    } else if (key === "?") {
      const help = document.getElementById("help");
      if (help) help.hidden = !help.hidden;
    } else handled = false;
    if (handled) event.preventDefault();
  });

  document.addEventListener("DOMContentLoaded", () => {
    const help = document.getElementById("help");
    const toggle = document.getElementById("help-toggle");
    if (help && toggle) toggle.addEventListener("click", () => { help.hidden = !help.hidden; });
    // Changing the attribute filter resets the label filter (labels belong to one attribute).
    document.querySelectorAll("select.autosubmit").forEach((select) => {
      select.addEventListener("change", () => {
        const label = select.form.querySelector('select[name="label"]');
        if (label) label.value = "";
        select.form.submit();
      });
    });
    // The heat map is computed on demand: say so while it loads, and say why if it cannot be made.
    const heatmap = document.getElementById("heatmap");
    const wait = document.getElementById("heatmap-wait");
    if (heatmap && wait) {
      const done = () => { wait.hidden = true; };
      if (heatmap.complete && heatmap.naturalWidth > 0) done();
      heatmap.addEventListener("load", done);
      heatmap.addEventListener("error", async () => {
        try {
          const answer = await fetch(heatmap.src, { headers: { "Accept": "application/json" }, credentials: "same-origin" });
          wait.textContent = "No heat map: " + ((await answer.json()).detail || answer.status);
        } catch (e) { wait.textContent = "No heat map: the server did not answer."; }
      });
    }
    const list = targets();
    focusOn(list.find((el) => el.dataset.state === "pending") || list[0]);
  });
})();
