// skutag review: keyboard review of one item, confirmation of bulk accepts. No build step.
(function () {
  "use strict";
  const csrf = document.querySelector('meta[name="csrf-token"]').content;

  async function post(url, body) {
    const response = await fetch(url, {
      method: "POST",
      headers: {"Content-Type": "application/json", "X-CSRF-Token": csrf, "Accept": "application/json"},
      body: JSON.stringify(body),
      credentials: "same-origin",
    });
    let data = {};
    try { data = await response.json(); } catch (e) { data = {ok: false, message: "unexpected answer " + response.status}; }
    return data;
  }

  function typing(event) {
    const target = event.target;
    return target && (target.tagName === "INPUT" || target.tagName === "SELECT" || target.tagName === "TEXTAREA");
  }

  // --- bulk accept: the count is shown and confirmed ---
  document.querySelectorAll("form.bulk").forEach(function (form) {
    form.addEventListener("submit", function (event) {
      const count = form.dataset.confirmCount;
      if (!window.confirm("Accept the model's answers for " + count + " items?")) { event.preventDefault(); }
    });
  });

  // --- queue: Enter starts, g opens the grid ---
  const start = document.getElementById("start");
  if (start && !document.getElementById("item-data")) {
    document.addEventListener("keydown", function (event) {
      if (typing(event)) { return; }
      if (event.key === "Enter") { window.location = start.href; }
      if (event.key === "g") { window.location = "/grid" + window.location.search; }
    });
  }

  // --- one item ---
  const dataNode = document.getElementById("item-data");
  if (!dataNode) { return; }
  const item = JSON.parse(dataNode.textContent);
  const status = document.getElementById("status");
  const rows = Array.from(document.querySelectorAll("tr[data-attribute]"));
  let attributes = item.attributes;
  let focus = Math.max(0, attributes.findIndex(function (a) { return a.open; }));
  let digits = "";
  let digitTimer = null;

  function say(text, bad) {
    status.textContent = text;
    status.className = bad ? "status error" : "status";
  }

  function render() {
    rows.forEach(function (row, index) {
      const attribute = attributes[index];
      row.classList.toggle("focused", index === focus);
      row.classList.toggle("open", attribute.open);
      const cell = row.querySelector("td.decision");
      cell.textContent = "";
      if (attribute.decided) {
        cell.textContent = attribute.decided_en + " ";
        const who = document.createElement("small");
        who.textContent = "by " + attribute.decided_by;
        cell.appendChild(who);
      } else if (attribute.open) {
        const em = document.createElement("em");
        em.textContent = attribute.reason;
        cell.appendChild(em);
      }
    });
    document.querySelectorAll("tr.choices").forEach(function (row) {
      row.classList.toggle("shown", row.dataset.choices === attributes[focus].name);
    });
  }

  function moveFocus(step) {
    focus = (focus + step + attributes.length) % attributes.length;
    render();
  }

  function nextOpen() {
    for (let step = 1; step <= attributes.length; step++) {
      const index = (focus + step) % attributes.length;
      if (attributes[index].open) { return index; }
    }
    return -1;
  }

  async function decide(action, value) {
    const attribute = attributes[focus];
    if (action === "accept" && attribute.blind) { say("blind audit: pick the value with the number keys", true); return; }
    const body = {sku: item.sku, attribute: attribute.name, action: action, job_id: item.job_id};
    if (value !== undefined) { body.value = value; }
    const answer = await post("/decide", body);
    if (!answer.ok) { say(answer.message || "refused", true); return; }
    attributes = answer.attributes;
    say("recorded: " + attribute.name);
    const following = nextOpen();
    if (following === -1 && !attributes.some(function (a) { return a.open; })) {
      window.location = item.next;
      return;
    }
    if (following !== -1) { focus = following; }
    render();
  }

  async function acceptAll() {
    const open = attributes.map(function (a, index) { return [a, index]; }).filter(function (pair) { return pair[0].open; });
    for (const pair of open) {
      if (pair[0].blind) { say("blind audit: pick each value with the number keys", true); return; }
    }
    for (const pair of open) {
      focus = pair[1];
      const answer = await post("/decide", {sku: item.sku, attribute: pair[0].name, action: "accept", job_id: item.job_id});
      if (!answer.ok) { say(answer.message || "refused", true); render(); return; }
      attributes = answer.attributes;
    }
    window.location = item.next;
  }

  async function undo() {
    const answer = await post("/undo", {});
    if (!answer.ok) { say(answer.message || "nothing to undo", true); return; }
    if (answer.sku && answer.sku !== item.sku) {
      window.location = "/item?sku=" + encodeURIComponent(answer.sku);
      return;
    }
    window.location.reload();
  }

  function pick(number) {
    const choices = attributes[focus].choices;
    if (number < 1 || number > choices.length) { say("no value " + number + " for " + attributes[focus].name, true); return; }
    decide("correct", choices[number - 1].id);
  }

  document.addEventListener("keydown", function (event) {
    if (typing(event) || event.ctrlKey || event.metaKey || event.altKey) { return; }
    const key = event.key;
    if (/^[0-9]$/.test(key)) {
      digits += key;
      clearTimeout(digitTimer);
      const choices = attributes[focus].choices.length;
      if (Number(digits) * 10 > choices) { const number = Number(digits); digits = ""; pick(number); return; }
      digitTimer = setTimeout(function () { const number = Number(digits); digits = ""; pick(number); }, 1000);
      return;
    }
    switch (key) {
      case "ArrowDown": moveFocus(1); break;
      case "ArrowUp": moveFocus(-1); break;
      case "a": case "Enter": decide("accept"); break;
      case "A": acceptAll(); break;
      case "n": if (attributes[focus].name !== "category") { decide("not_visible"); } break;
      case "u": undo(); break;
      case "j": window.location = item.next; break;
      case "k": window.history.back(); break;
      case "q": window.location = "/"; break;
      case "g": window.location = "/grid"; break;
      default: return;
    }
    event.preventDefault();
  });

  if (item.held_by) { say(item.held_by + " is reviewing this item; decisions will be refused", true); }
  render();
})();
