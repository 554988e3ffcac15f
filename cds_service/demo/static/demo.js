/* Demo EHR: fires CDS Hooks at this service the way an EHR does and renders the cards.
 *
 * Plain browser JavaScript, no dependencies. Every piece of text from the service or the demo data
 * reaches the page through textContent / createTextNode (never parsed as HTML), and card `detail`
 * markdown is rendered by a small subset renderer that builds DOM nodes, so no HTML in the data can
 * become markup. Only http(s) link targets are made clickable.
 */
(function () {
  "use strict";

  var USER_ID = "Practitioner/demo-clinician";
  var FALLBACK_SERVICES = {
    "patient-view": "b12-neck-pain-patient-view",
    "order-select": "b12-neck-pain-order-select",
    "order-sign": "b12-neck-pain-order-sign"
  };
  var DRAFT_ORDERS = {
    "b12-test": function (patientId) {
      return {
        resourceType: "ServiceRequest",
        id: "demo-draft-b12-test",
        status: "draft",
        intent: "order",
        code: {
          coding: [{ system: "http://loinc.org", code: "2132-9",
                     display: "Cobalamin (Vitamin B12) [Mass/volume] in Serum or Plasma" }],
          text: "Vitamin B12 serum test"
        },
        subject: { reference: "Patient/" + patientId },
        requester: { reference: USER_ID },
        authoredOn: new Date().toISOString().slice(0, 10)
      };
    },
    "b12-local": function (patientId) {
      // As many EHRs send it: only the EHR's own orderable code, the test named in text/display.
      return {
        resourceType: "ServiceRequest",
        id: "demo-draft-b12-local",
        status: "draft",
        intent: "order",
        code: {
          coding: [{ system: "https://ehr.example.org/fhir/CodeSystem/orderables", code: "LAB-00417",
                     display: "VIT B12/FOLATE SERUM" }],
          text: "B12 & folate"
        },
        subject: { reference: "Patient/" + patientId },
        requester: { reference: USER_ID },
        authoredOn: new Date().toISOString().slice(0, 10)
      };
    },
    "naproxen": function (patientId) {
      return {
        resourceType: "MedicationRequest",
        id: "demo-draft-naproxen",
        status: "draft",
        intent: "order",
        // Text only: this project ships no code it has not verified (see clinical-knowledge.md).
        medicationCodeableConcept: { text: "Naproxen 500 mg tablet" },
        subject: { reference: "Patient/" + patientId },
        requester: { reference: USER_ID },
        authoredOn: new Date().toISOString().slice(0, 10)
      };
    }
  };
  var MAX_EXCHANGES = 25;

  var state = {
    patients: [],
    current: null,
    services: Object.assign({}, FALLBACK_SERVICES),
    sequence: 0,
    reportSequence: 0
  };

  // ------------------------------------------------------------------------------------------
  // Small DOM helpers (text only)
  // ------------------------------------------------------------------------------------------

  function $(id) { return document.getElementById(id); }

  function el(tag, attrs, children) {
    var node = document.createElement(tag);
    if (attrs) {
      Object.keys(attrs).forEach(function (key) {
        var value = attrs[key];
        if (value === undefined || value === null || value === false) { return; }
        if (key === "text") { node.textContent = String(value); }
        else if (key === "className") { node.className = value; }
        else if (key.slice(0, 2) === "on" && typeof value === "function") {
          node.addEventListener(key.slice(2), value);
        } else { node.setAttribute(key, value === true ? "" : String(value)); }
      });
    }
    (children || []).forEach(function (child) {
      if (child === null || child === undefined) { return; }
      node.appendChild(typeof child === "string" ? document.createTextNode(child) : child);
    });
    return node;
  }

  function clear(node) { while (node.firstChild) { node.removeChild(node.firstChild); } }

  function safeUrl(url) {
    if (typeof url !== "string") { return null; }
    return /^https?:\/\//i.test(url.trim()) ? url.trim() : null;
  }

  function uuid() {
    if (window.crypto && typeof window.crypto.randomUUID === "function") {
      return window.crypto.randomUUID();
    }
    var b = new Uint8Array(16);
    window.crypto.getRandomValues(b);
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    var h = Array.prototype.map.call(b, function (x) { return (x + 0x100).toString(16).slice(1); }).join("");
    return h.slice(0, 8) + "-" + h.slice(8, 12) + "-" + h.slice(12, 16) + "-" + h.slice(16, 20) + "-" + h.slice(20);
  }

  // ------------------------------------------------------------------------------------------
  // Markdown (a safe subset: headings, lists, quotes, paragraphs, bold, italics, code, links)
  // ------------------------------------------------------------------------------------------

  var INLINE = /(`[^`]+`)|(\*\*[^*]+?\*\*|__[^_]+?__)|(\[[^\]]+\]\([^)\s]+\))|(\*[^*\s][^*]*?\*|\b_[^_\s][^_]*?_\b)/;

  function renderInline(text, parent) {
    var rest = text;
    while (rest.length) {
      var m = INLINE.exec(rest);
      if (!m) { parent.appendChild(document.createTextNode(rest)); break; }
      if (m.index > 0) { parent.appendChild(document.createTextNode(rest.slice(0, m.index))); }
      var token = m[0];
      if (m[1]) {
        parent.appendChild(el("code", { text: token.slice(1, -1) }));
      } else if (m[2]) {
        var strong = el("strong");
        renderInline(token.slice(2, -2), strong);
        parent.appendChild(strong);
      } else if (m[3]) {
        var close = token.indexOf("](");
        var label = token.slice(1, close);
        var href = safeUrl(token.slice(close + 2, -1));
        if (href) {
          var a = el("a", { href: href, target: "_blank", rel: "noopener noreferrer" });
          renderInline(label, a);
          parent.appendChild(a);
        } else {
          renderInline(label, parent);
        }
      } else {
        var em = el("em");
        renderInline(token.slice(1, -1), em);
        parent.appendChild(em);
      }
      rest = rest.slice(m.index + token.length);
    }
  }

  function renderMarkdown(source) {
    var root = el("div", { className: "markdown" });
    var lines = String(source || "").replace(/\r\n?/g, "\n").split("\n");
    var paragraph = [];
    var list = null;

    function flushParagraph() {
      if (!paragraph.length) { return; }
      var p = el("p");
      paragraph.forEach(function (line, i) {
        if (i > 0) { p.appendChild(/ {2,}$/.test(paragraph[i - 1]) ? el("br") : document.createTextNode(" ")); }
        renderInline(line.trim(), p);
      });
      root.appendChild(p);
      paragraph = [];
    }
    function flushList() { list = null; }

    lines.forEach(function (line) {
      var heading = /^(#{1,6})\s+(.*)$/.exec(line);
      var bullet = /^\s*[-*+]\s+(.*)$/.exec(line);
      var numbered = /^\s*(\d+)[.)]\s+(.*)$/.exec(line);
      var quote = /^>\s?(.*)$/.exec(line);
      if (!line.trim()) { flushParagraph(); flushList(); return; }
      if (heading) {
        flushParagraph(); flushList();
        var h = el("h" + Math.min(6, heading[1].length + 3));
        renderInline(heading[2], h);
        root.appendChild(h);
      } else if (bullet || numbered) {
        flushParagraph();
        var tag = bullet ? "ul" : "ol";
        if (!list || list.tagName.toLowerCase() !== tag) { list = el(tag); root.appendChild(list); }
        var li = el("li");
        renderInline(bullet ? bullet[1] : numbered[2], li);
        list.appendChild(li);
      } else if (quote) {
        flushParagraph(); flushList();
        var bq = el("blockquote");
        renderInline(quote[1], bq);
        root.appendChild(bq);
      } else if (list && /^\s{2,}\S/.test(line)) {
        list.lastChild.appendChild(document.createTextNode(" "));
        renderInline(line.trim(), list.lastChild);
      } else {
        flushList();
        paragraph.push(line);
      }
    });
    flushParagraph();
    return root;
  }

  // ------------------------------------------------------------------------------------------
  // HTTP: demo helpers and the CDS service (recorded in the developer panel)
  // ------------------------------------------------------------------------------------------

  function readJson(response) {
    return response.text().then(function (text) {
      var body = null;
      try { body = text ? JSON.parse(text) : null; } catch (e) { body = text; }
      return { status: response.status, ok: response.ok, body: body };
    });
  }

  function demoApi(method, url, body) {
    var init = { method: method, headers: { "Accept": "application/json" }, credentials: "same-origin" };
    if (body !== undefined) {
      init.headers["Content-Type"] = "application/json";
      init.body = JSON.stringify(body);
    }
    return fetch(url, init).then(readJson).then(function (r) {
      if (!r.ok) { throw new Error(method + " " + url + " answered " + r.status + errorText(r.body)); }
      return r.body;
    });
  }

  function errorText(body) {
    if (body && body.resourceType === "OperationOutcome" && body.issue && body.issue[0]) {
      return ": " + (body.issue[0].diagnostics || body.issue[0].code);
    }
    return "";
  }

  function decodeJwtPart(part) {
    try {
      var b64 = part.replace(/-/g, "+").replace(/_/g, "/");
      while (b64.length % 4) { b64 += "="; }
      return JSON.parse(atob(b64));
    } catch (e) { return null; }
  }

  /** Call the CDS service as an EHR: a fresh JWT (aud = the URL called) on every request. */
  function cds(method, path, body, label) {
    var started = performance.now();
    return demoApi("POST", "/demo/api/token", { path: path }).then(function (minted) {
      var headers = { "Accept": "application/json", "Authorization": "Bearer " + minted.token };
      var init = { method: method, headers: headers, credentials: "omit" };
      if (body !== undefined) {
        headers["Content-Type"] = "application/json";
        init.body = JSON.stringify(body);
      }
      return fetch(path, init).then(readJson).then(function (result) {
        var parts = minted.token.split(".");
        recordExchange({
          label: label, method: method, url: new URL(path, window.location.href).href,
          headers: Object.assign({}, headers, { "Authorization": "Bearer " + minted.token.slice(0, 24) + "…" }),
          jwt: { header: decodeJwtPart(parts[0]), payload: decodeJwtPart(parts[1]) },
          body: body, status: result.status, response: result.body,
          ms: Math.round(performance.now() - started)
        });
        return result;
      });
    });
  }

  function recordExchange(x) {
    var list = $("exchanges");
    Array.prototype.forEach.call(list.querySelectorAll("details[open]"), function (d) { d.open = false; });
    var statusClass = x.status >= 200 && x.status < 300 ? "status-ok" : "status-bad";
    var sections = [
      el("h3", { text: "Request" }),
      el("pre", { text: x.method + " " + x.url + "\n" + Object.keys(x.headers).map(function (k) {
        return k + ": " + x.headers[k];
      }).join("\n") }),
      el("h3", { text: "JWT (decoded)" }),
      el("pre", { text: JSON.stringify(x.jwt, null, 2) })
    ];
    if (x.body !== undefined) {
      sections.push(el("h3", { text: "Request body" }), el("pre", { text: JSON.stringify(x.body, null, 2) }));
    }
    sections.push(el("h3", { text: "Response " + x.status }),
                  el("pre", { text: typeof x.response === "string" ? x.response : JSON.stringify(x.response, null, 2) }));
    var item = el("li", { "data-status": x.status }, [
      el("details", { open: true }, [
        el("summary", {}, [x.label + ": " + x.method + " " + new URL(x.url).pathname + " → ",
                           el("span", { className: statusClass, text: String(x.status) }),
                           " (" + x.ms + " ms)"])
      ])
    ]);
    var details = item.firstChild;
    sections.forEach(function (s) { details.appendChild(s); });
    list.insertBefore(item, list.firstChild);
    while (list.children.length > MAX_EXCHANGES) { list.removeChild(list.lastChild); }
  }

  // ------------------------------------------------------------------------------------------
  // Patients and the chart
  // ------------------------------------------------------------------------------------------

  function expectedLabel(expected) {
    var labels = { "low-b12": "low B12 card", "mma-test": "MMA test card", "b12-test": "B12 test card" };
    if (!expected) { return ""; }
    return "Expected: " + (labels[expected] || "no card (" + String(expected).replace(/[-_]/g, " ") + ")");
  }

  function renderPatients() {
    var list = $("patient-list");
    clear(list);
    state.patients.forEach(function (p) {
      var button = el("button", {
        type: "button", className: "patient-button", "data-patient-id": p.patientId,
        "aria-current": state.current && state.current.patientId === p.patientId ? "true" : "false",
        onclick: function () { selectPatient(p.patientId); }
      }, [
        el("span", { className: "p-name", text: p.name }),
        el("span", { className: "p-desc", text: p.description }),
        p.expected ? el("span", { className: "p-expected", text: expectedLabel(p.expected) }) : null
      ]);
      list.appendChild(el("li", {}, [button]));
    });
    $("patients-status").textContent = state.patients.length + " synthetic patients";
  }

  function item(text, meta) {
    return el("li", {}, [text || "(no text)", meta ? el("span", { className: "meta", text: " · " + meta }) : null]);
  }

  function fillList(id, items, empty, fn) {
    var node = $(id);
    clear(node);
    if (!items.length) { node.appendChild(el("li", { className: "muted", text: empty })); return; }
    items.forEach(function (x) { node.appendChild(fn(x)); });
  }

  function join() {
    return Array.prototype.filter.call(arguments, function (x) { return x; }).join(" · ");
  }

  function ageFrom(birthDate) {
    if (!birthDate) { return ""; }
    var b = new Date(birthDate), now = new Date();
    var age = now.getFullYear() - b.getFullYear();
    if (now.getMonth() < b.getMonth() || (now.getMonth() === b.getMonth() && now.getDate() < b.getDate())) { age -= 1; }
    return isNaN(age) ? "" : age + " years";
  }

  function renderChart(p) {
    var chart = p.chart || {};
    var patient = chart.patient || {};
    $("patient-name").textContent = p.name;
    $("patient-demographics").textContent = join(patient.gender, patient.birthDate ? "born " + patient.birthDate : "",
                                                 ageFrom(patient.birthDate), "id " + p.patientId);
    $("patient-description").textContent = p.description;
    fillList("problems", chart.problems || [], "No problems recorded", function (x) {
      return item(x.text, join(x.status, x.onset && "since " + x.onset));
    });
    fillList("medications", chart.medications || [], "No medications recorded", function (x) {
      return item(x.text, join(x.status, x.kind, x.date));
    });
    var other = [].concat(
      (chart.procedures || []).map(function (x) { return { text: "Procedure: " + x.text, meta: join(x.status, x.date) }; }),
      (chart.findings || []).map(function (x) { return { text: "Finding: " + x.text + (x.value ? ": " + x.value : ""), meta: x.date }; }),
      (chart.orders || []).map(function (x) { return { text: "Order: " + x.text, meta: join(x.status, x.date) }; })
    );
    fillList("other", other, "Nothing recorded", function (x) { return item(x.text, x.meta); });
    var tbody = $("results");
    clear(tbody);
    var results = chart.results || [];
    if (!results.length) {
      tbody.appendChild(el("tr", {}, [el("td", { colspan: 3, className: "muted", text: "No B12 or MMA results" })]));
    }
    results.forEach(function (r) {
      tbody.appendChild(el("tr", {}, [
        el("td", { text: r.date || "" }),
        el("td", { text: r.text }),
        el("td", { text: join(r.value, r.interpretation) })
      ]));
    });
  }

  function selectPatient(patientId) {
    var p = state.patients.filter(function (x) { return x.patientId === patientId; })[0];
    if (!p) { return; }
    state.current = p;
    renderPatients();
    $("welcome").hidden = true;
    $("patient").hidden = false;
    renderChart(p);
    setView("chart");
    firePatientView();
  }

  function setView(view) {
    $("view-chart").setAttribute("aria-pressed", String(view === "chart"));
    $("view-order").setAttribute("aria-pressed", String(view === "order"));
    $("chart-view").hidden = view !== "chart";
    $("order-view").hidden = view !== "order";
  }

  // ------------------------------------------------------------------------------------------
  // Hooks
  // ------------------------------------------------------------------------------------------

  function fireHook(hook, extraContext) {
    var p = state.current;
    var seq = ++state.sequence;
    var serviceId = state.services[hook];
    var cardsNode = $("cards");
    cardsNode.setAttribute("data-state", "loading");
    cardsNode.setAttribute("data-patient", p.patientId);
    cardsNode.setAttribute("data-hook", hook);
    clear(cardsNode);
    $("cards-status").textContent = "Calling " + serviceId + " (" + hook + ")…";
    return demoApi("GET", "/demo/api/patients/" + encodeURIComponent(p.patientId) + "/prefetch?hook=" + encodeURIComponent(hook))
      .then(function (pre) {
        var context = Object.assign({ userId: USER_ID, patientId: p.patientId }, extraContext || {});
        var body = { hook: hook, hookInstance: uuid(), context: context, prefetch: pre.prefetch };
        return cds("POST", "/cds-services/" + encodeURIComponent(serviceId), body, hook);
      })
      .then(function (result) {
        if (seq !== state.sequence) { return; }  // a newer call replaced this one
        if (!result.ok) { throw new Error("the service answered " + result.status + errorText(result.body)); }
        var cards = (result.body && result.body.cards) || [];
        var why = explanationOf(result.body);
        cards.forEach(function (card) {
          var node = renderCard(card, serviceId);
          if (why) { node.appendChild(renderExplanation(why, "Why this card")); }
          cardsNode.appendChild(node);
        });
        if (!cards.length && why) { cardsNode.appendChild(renderExplanation(why, "Why no card")); }
        $("cards-status").textContent = cards.length
          ? cards.length + (cards.length === 1 ? " card" : " cards") + " from " + serviceId + " (" + hook + ")"
          : "No cards: " + serviceId + " (" + hook + ") returned an empty list.";
        cardsNode.setAttribute("data-state", "done");
        if (cards.length) { loadReport(); }  // the report counts issued cards
      })
      .catch(function (err) {
        if (seq !== state.sequence) { return; }
        $("cards-status").textContent = "Hook call failed: " + err.message;
        cardsNode.setAttribute("data-state", "error");
      });
  }

  function firePatientView() { return fireHook("patient-view"); }

  function fireOrderSelect(choice) {
    var draft = DRAFT_ORDERS[choice](state.current.patientId);
    return fireHook("order-select", {
      selections: [draft.resourceType + "/" + draft.id],
      draftOrders: { resourceType: "Bundle", type: "collection", entry: [{ resource: draft }] }
    });
  }

  // ------------------------------------------------------------------------------------------
  // Cards and feedback
  // ------------------------------------------------------------------------------------------

  var INDICATOR_LABEL = { info: "Info", warning: "Warning", critical: "Critical" };

  // ------------------------------------------------------------------------------------------
  // Why: the service's explanation of its decision (demo and dev modes only), shown as text
  // ------------------------------------------------------------------------------------------

  var EXPLANATION_EXTENSION = "org.b12-neck-cds.explanation";

  function explanationOf(body) {
    var ext = body && body.extension;
    return ext && typeof ext === "object" ? ext[EXPLANATION_EXTENSION] || null : null;
  }

  function evidenceText(x) {
    if (x && typeof x === "object") {
      if (x.key && Array.isArray(x.evidence)) {
        return x.key + ": " + x.evidence.map(evidenceText).join("; ");
      }
      if (x.loinc !== undefined) {
        var value = x.value === null || x.value === undefined ? "no readable value"
          : (x.comparator || "") + x.value + (x.unit ? " " + x.unit : "");
        return join("Observation/" + (x.resource_id || "?"), "LOINC " + x.loinc, x.on, value);
      }
      if (x.resource_type) {
        return join(x.reference || x.resource_type,
                    x.code ? "code " + x.code + (x.system ? " (" + x.system + ")" : "") : "matched by text",
                    x.on, x.label ? "“" + x.label + "”" : "");
      }
      return JSON.stringify(x);
    }
    return String(x);
  }

  function renderExplanation(why, title) {
    var d = why.decision || {};
    var details = el("details", { className: "why", "data-why": d.kind ? "card" : "no-card",
                                  "data-reason": d.reason || "" }, [el("summary", { text: title })]);
    details.appendChild(el("p", { className: "why-decision", text:
      (d.kind ? "Card " + d.kind : "No card") + ": reason " + d.reason +
      (d.rule ? " (rule " + d.rule + " of the rules table, " + d.rules_table + ")" : "") }));
    if (d.b12_result) { details.appendChild(el("p", { text: "Latest B12 result used: " + evidenceText(d.b12_result) + " → " + d.b12_band })); }
    var facts = why.facts || {};
    var found = el("ul", { className: "why-facts", "aria-label": "Facts found" });
    Object.keys(facts).forEach(function (name) {
      var value = facts[name];
      var items = Array.isArray(value) ? value : [value];
      var li = el("li", { "data-fact": name }, [el("strong", { text: name.replace(/_/g, " ") + ": " })]);
      li.appendChild(document.createTextNode(items.map(evidenceText).join(" | ")));
      found.appendChild(li);
    });
    details.appendChild(el("h5", { text: "Facts found" }));
    details.appendChild(Object.keys(facts).length ? found : el("p", { className: "muted", text: "None" }));
    var missing = why.not_found || [];
    if (missing.length) {
      details.appendChild(el("h5", { text: "Looked for and not found" }));
      details.appendChild(el("ul", { className: "why-not-found" }, missing.map(function (m) {
        return el("li", { "data-fact": m.fact, text: m.looked_for });
      })));
    }
    details.appendChild(el("p", { className: "why-unavailable", text: "Could not be had: " +
      ((why.unavailable || []).map(function (u) { return u.what; }).join(", ") || "nothing") }));
    details.appendChild(el("p", { className: "why-skipped", text: "Skipped as invalid FHIR R4: " +
      ((why.skipped_invalid || []).join(", ") || "nothing") }));
    return details;
  }

  function renderCard(card, serviceId) {
    var indicator = INDICATOR_LABEL[card.indicator] ? card.indicator : "info";
    var summaryId = "card-" + uuid();
    var node = el("article", {
      className: "card indicator-" + indicator, "aria-labelledby": summaryId,
      "data-card-uuid": card.uuid || "", "data-indicator": indicator
    });
    node.appendChild(el("div", { className: "card-top" }, [
      el("span", { className: "indicator-badge", text: INDICATOR_LABEL[indicator] }),
      el("h4", { className: "card-summary", id: summaryId, text: card.summary || "" })
    ]));
    if (card.source) {
      var sourceUrl = safeUrl(card.source.url);
      node.appendChild(el("p", { className: "card-source" }, [
        "Source: ",
        sourceUrl ? el("a", { href: sourceUrl, target: "_blank", rel: "noopener noreferrer", text: card.source.label })
                  : el("span", { text: card.source.label || "" }),
        card.source.topic && card.source.topic.display ? " · " + card.source.topic.display : null
      ]));
    }
    if (card.detail) {
      var detail = renderMarkdown(card.detail);
      detail.className = "card-detail";
      node.appendChild(detail);
    }
    if (card.links && card.links.length) {
      var links = el("ul", { className: "card-links", "aria-label": "Links" });
      card.links.forEach(function (link) {
        var href = safeUrl(link.url);
        if (link.type === "absolute" && href) {
          links.appendChild(el("li", {}, [el("a", { href: href, target: "_blank", rel: "noopener noreferrer", text: link.label })]));
        } else {
          links.appendChild(el("li", {}, [el("span", { text: link.label + " (SMART app: not launched in the demo)" })]));
        }
      });
      node.appendChild(links);
    }
    var outcome = el("p", { className: "card-outcome", role: "status" });
    var controls = [];
    var actions = el("div", { className: "card-actions" });

    (card.suggestions || []).forEach(function (s) {
      var canSend = Boolean(card.uuid && s.uuid);
      var b = el("button", {
        type: "button", className: "suggestion" + (s.isRecommended ? " primary" : ""),
        "data-suggestion-uuid": s.uuid || "", disabled: !canSend,
        title: (s.actions || []).map(function (a) { return a.type + ": " + a.description; }).join("\n") || null,
        onclick: function () {
          sendFeedback(serviceId, card, { outcome: "accepted", acceptedSuggestions: [{ id: s.uuid }] },
                       "Accepted: " + s.label + " (an EHR would now apply the suggestion's actions; the demo does not)",
                       controls, outcome, node);
        }
      }, [s.label, s.isRecommended ? el("span", { className: "recommended", text: "(recommended)" }) : null]);
      controls.push(b);
      actions.appendChild(b);
    });

    if (card.uuid) {
      var formId = "dismiss-" + uuid();
      var form = buildDismissForm(card, formId, function (overrideReason, text) {
        var entry = { outcome: "overridden" };
        if (overrideReason) { entry.overrideReason = overrideReason; }
        sendFeedback(serviceId, card, entry, text, controls, outcome, node);
        form.hidden = true;
        toggle.setAttribute("aria-expanded", "false");
      });
      var toggle = el("button", {
        type: "button", className: "dismiss-toggle", "aria-expanded": "false", "aria-controls": formId,
        onclick: function () {
          form.hidden = !form.hidden;
          toggle.setAttribute("aria-expanded", String(!form.hidden));
          if (!form.hidden) { var first = form.querySelector("input, textarea"); if (first) { first.focus(); } }
        }
      }, ["Dismiss…"]);
      controls.push(toggle);
      actions.appendChild(toggle);
      node.appendChild(actions);
      node.appendChild(form);
      Array.prototype.forEach.call(form.querySelectorAll("input, textarea, button"), function (c) { controls.push(c); });
    } else {
      node.appendChild(actions);
      node.appendChild(el("p", { className: "muted", text: "This card has no uuid, so no feedback can be sent." }));
    }
    node.appendChild(outcome);
    return node;
  }

  function buildDismissForm(card, formId, onSubmit) {
    var name = formId + "-reason";
    var fieldset = el("fieldset", {}, [el("legend", { text: "Why are you dismissing this card?" })]);
    (card.overrideReasons || []).forEach(function (r, i) {
      var id = formId + "-r" + i;
      fieldset.appendChild(el("label", { className: "reason", "for": id }, [
        el("input", { type: "radio", name: name, id: id, value: String(i), "data-code": r.code }),
        " " + (r.display || r.code)
      ]));
    });
    var commentId = formId + "-comment";
    fieldset.appendChild(el("label", { "for": commentId, text: "Comment (optional)" }));
    fieldset.appendChild(el("textarea", { id: commentId, maxlength: "1000" }));
    var form = el("form", { id: formId, className: "dismiss-form", hidden: true }, [
      fieldset, el("button", { type: "submit", className: "primary dismiss-submit" }, ["Dismiss card"])
    ]);
    form.addEventListener("submit", function (event) {
      event.preventDefault();
      var chosen = form.querySelector("input[type=radio]:checked");
      var comment = $(commentId).value.trim();
      var overrideReason = null;
      var text = "Dismissed";
      if (chosen || comment) {
        overrideReason = {};
        if (chosen) {
          var r = card.overrideReasons[Number(chosen.value)];
          overrideReason.reason = { system: r.system, code: r.code, display: r.display };
          text += ": " + (r.display || r.code);
        }
        if (comment) { overrideReason.userComment = comment; }
      }
      onSubmit(overrideReason, text);
    });
    return form;
  }

  function sendFeedback(serviceId, card, entry, text, controls, outcomeNode, cardNode) {
    controls.forEach(function (c) { c.disabled = true; });
    outcomeNode.className = "card-outcome";
    outcomeNode.textContent = "Sending feedback…";
    var feedback = Object.assign({ card: card.uuid }, entry, { outcomeTimestamp: new Date().toISOString() });
    return cds("POST", "/cds-services/" + encodeURIComponent(serviceId) + "/feedback", { feedback: [feedback] }, "feedback")
      .then(function (result) {
        if (!result.ok) { throw new Error("the service answered " + result.status + errorText(result.body)); }
        outcomeNode.textContent = text + ". Feedback sent.";
        cardNode.classList.add("done");
        cardNode.setAttribute("data-feedback", entry.outcome);
        return loadReport();
      })
      .catch(function (err) {
        outcomeNode.className = "card-outcome error";
        outcomeNode.textContent = "Feedback failed: " + err.message;
        controls.forEach(function (c) { c.disabled = false; });
      });
  }

  // ------------------------------------------------------------------------------------------
  // Feedback report
  // ------------------------------------------------------------------------------------------

  function pct(rate) { return rate === null || rate === undefined ? "–" : Math.round(rate * 100) + "%"; }

  function loadReport() {
    var node = $("report");
    var seq = ++state.reportSequence;
    return cds("GET", "/admin/feedback-report", undefined, "report").then(function (result) {
      if (seq !== state.reportSequence) { return; }  // a newer report is on its way
      clear(node);
      if (!result.ok) {
        node.appendChild(el("p", { className: "error", text: "Report unavailable: " + result.status + errorText(result.body) }));
        return;
      }
      var report = result.body || {};
      var kinds = report.kinds || [];
      var table = el("table", { id: "report-table" }, [
        el("caption", { className: "visually-hidden", text: "Feedback per card kind" }),
        el("thead", {}, [el("tr", {}, ["Card kind", "Issued", "Accepted", "Overridden", "Acceptance", "Override reasons"]
          .map(function (h) { return el("th", { scope: "col", text: h }); }))])
      ]);
      var tbody = el("tbody");
      kinds.forEach(function (k) {
        tbody.appendChild(el("tr", { "data-kind": k.kind }, [
          el("th", { scope: "row", text: k.kind }),
          el("td", { text: String(k.issued), "data-field": "issued" }),
          el("td", { text: String(k.accepted), "data-field": "accepted" }),
          el("td", { text: String(k.overridden), "data-field": "overridden" }),
          el("td", { text: pct(k.acceptance_rate) }),
          el("td", { text: (k.override_reasons || []).map(function (r) {
            return (r.display || r.code) + " ×" + r.count;
          }).join("; ") || "–" })
        ]));
      });
      if (!kinds.length) {
        tbody.appendChild(el("tr", {}, [el("td", { colspan: 6, className: "muted", text: "No cards issued yet." })]));
      }
      table.appendChild(tbody);
      var totals = report.totals || {};
      node.appendChild(table);
      node.appendChild(el("p", { id: "report-totals", text:
        "Totals: " + (totals.issued || 0) + " issued, " + (totals.accepted || 0) + " accepted, " +
        (totals.overridden || 0) + " overridden (acceptance " + pct(totals.acceptance_rate) + ")." }));
    }).catch(function (err) {
      if (seq !== state.reportSequence) { return; }
      clear(node);
      node.appendChild(el("p", { className: "error", text: "Report unavailable: " + err.message }));
    });
  }

  // ------------------------------------------------------------------------------------------
  // Start
  // ------------------------------------------------------------------------------------------

  function discover() {
    return cds("GET", "/cds-services", undefined, "discovery").then(function (result) {
      ((result.body && result.body.services) || []).forEach(function (svc) {
        if (svc.hook && svc.id) { state.services[svc.hook] = svc.id; }
      });
    }).catch(function () { /* keep the built-in service ids */ });
  }

  function resetDemoPatients() {
    return demoApi("POST", "/demo/api/reset", {}).then(function (result) {
      $("demo-reset-status").textContent = result.cleared
        ? "Suppressions forgotten: " + result.cleared
        : "No suppressions on the demo patients.";
    }).catch(function (err) {
      $("demo-reset-status").textContent = "Could not reset the demo patients: " + err.message;
    });
  }

  function start() {
    $("view-chart").addEventListener("click", function () { setView("chart"); firePatientView(); });
    $("view-order").addEventListener("click", function () { setView("order"); });
    $("order-form").addEventListener("submit", function (event) {
      event.preventDefault();
      fireOrderSelect($("order-choice").value);
    });
    $("report-refresh").addEventListener("click", loadReport);
    $("demo-reset").addEventListener("click", function () {
      resetDemoPatients().then(function () {
        if (state.current) { setView("chart"); firePatientView(); }
      });
    });
    // Feedback suppresses a card kind for the patient (cards/suppression.json): a new visit
    // starts from the demo patients as the catalog describes them.
    resetDemoPatients().then(discover).then(function () {
      return demoApi("GET", "/demo/api/patients");
    }).then(function (data) {
      state.patients = data.patients || [];
      renderPatients();
      document.body.setAttribute("data-ready", "true");
      return loadReport();
    }).catch(function (err) {
      $("patients-status").textContent = "Could not load the demo patients: " + err.message;
      $("patients-status").className = "error";
    });
  }

  window.B12Demo = { renderMarkdown: renderMarkdown };  // for tests of the renderer
  document.addEventListener("DOMContentLoaded", start);
}());
