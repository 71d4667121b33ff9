/*
 * Runs Debezium's embedded engine with the PostgreSQL connector and prints every record it produces to
 * stdout, one JSON object a line:
 *
 *     {"topic": ..., "key": <key JSON or null>, "value": <value JSON or null for a tombstone>,
 *      "headers": {name: value as a string}}
 *
 * The key and value are the JsonConverter's text, embedded as JSON. Logs go to stderr. The engine stops
 * when stdin is closed (or reaches its end); the process exits 1 if the engine fails.
 *
 * Run with Java 17's single-file source launcher, the Debezium jars on the class path:
 *
 *     java -cp 'LIBDIR/*' Record.java engine.properties
 *
 * engine.properties holds every engine and connector property. Normally started by
 * `python -m tests.support.debezium_record`, which also gets the jars and writes that file.
 */

import com.fasterxml.jackson.databind.JsonNode;
import com.fasterxml.jackson.databind.ObjectMapper;
import com.fasterxml.jackson.databind.node.NullNode;
import com.fasterxml.jackson.databind.node.ObjectNode;
import io.debezium.engine.ChangeEvent;
import io.debezium.engine.DebeziumEngine;
import io.debezium.engine.Header;
import io.debezium.engine.format.Json;
import io.debezium.engine.format.KeyValueHeaderChangeEventFormat;
import java.io.FileDescriptor;
import java.io.FileInputStream;
import java.io.FileOutputStream;
import java.io.InputStream;
import java.io.OutputStreamWriter;
import java.io.PrintStream;
import java.io.PrintWriter;
import java.nio.charset.StandardCharsets;
import java.util.List;
import java.util.Properties;
import java.util.concurrent.ExecutorService;
import java.util.concurrent.Executors;
import java.util.concurrent.TimeUnit;
import java.util.concurrent.atomic.AtomicBoolean;

public class Record {
    private static final ObjectMapper JSON = new ObjectMapper();

    public static void main(String[] args) throws Exception {
        // Records own stdout; anything else (log frameworks print to System.out by default) goes to stderr.
        PrintWriter out = new PrintWriter(new OutputStreamWriter(
                new FileOutputStream(FileDescriptor.out), StandardCharsets.UTF_8), false);
        System.setOut(new PrintStream(new FileOutputStream(FileDescriptor.err), true, StandardCharsets.UTF_8));

        if (args.length != 1) {
            System.err.println("usage: java -cp 'LIBDIR/*' Record.java engine.properties");
            System.exit(2);
        }
        Properties props = new Properties();
        try (InputStream in = new FileInputStream(args[0])) {
            props.load(in);
        }

        AtomicBoolean stopping = new AtomicBoolean(false);
        AtomicBoolean failed = new AtomicBoolean(false);
        DebeziumEngine<ChangeEvent<String, String>> engine = DebeziumEngine
                .create(KeyValueHeaderChangeEventFormat.of(Json.class, Json.class, Json.class))
                .using(props)
                .notifying(event -> print(out, event))
                .using((success, message, error) -> {
                    if (!success && !stopping.get()) {
                        failed.set(true);
                        System.err.println("debezium engine failed: " + message);
                        if (error != null) {
                            error.printStackTrace();
                        }
                    }
                    System.err.println("debezium engine completed: success=" + success + " " + message);
                })
                .build();

        ExecutorService executor = Executors.newSingleThreadExecutor();
        executor.execute(engine);
        Thread watcher = new Thread(() -> {
            try {
                while (System.in.read() != -1) {
                    // anything written to stdin is ignored; its end means stop
                }
            } catch (Exception e) {
                // stdin gone: stop as well
            }
            stopping.set(true);
        }, "stdin-watcher");
        watcher.setDaemon(true);
        watcher.start();

        executor.shutdown();
        while (!executor.awaitTermination(200, TimeUnit.MILLISECONDS)) {
            if (stopping.get()) {
                System.err.println("stdin closed: stopping the engine");
                engine.close();
                executor.awaitTermination(30, TimeUnit.SECONDS);
                break;
            }
        }
        out.flush();
        System.exit(failed.get() ? 1 : 0);
    }

    private static JsonNode parse(String text) {
        if (text == null) {
            return NullNode.getInstance();
        }
        try {
            return JSON.readTree(text);
        } catch (Exception e) {
            throw new RuntimeException("not JSON: " + text, e);
        }
    }

    private static synchronized void print(PrintWriter out, ChangeEvent<String, String> event) {
        ObjectNode line = JSON.createObjectNode();
        line.put("topic", event.destination());
        line.set("key", parse(event.key()));
        line.set("value", parse(event.value()));
        ObjectNode headers = line.putObject("headers");
        List<Header<Object>> list = event.headers();
        if (list != null) {
            for (Header<Object> h : list) {
                Object v = h.getValue();
                String s;
                if (v == null) {
                    s = null;
                } else if (v instanceof byte[]) {
                    s = new String((byte[]) v, StandardCharsets.UTF_8);
                } else {
                    s = v.toString();
                }
                headers.put(h.getKey(), s);
            }
        }
        try {
            out.println(JSON.writeValueAsString(line));
        } catch (Exception e) {
            throw new RuntimeException(e);
        }
        out.flush();
    }
}
